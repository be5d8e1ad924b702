"""Synthetic speech corpus for pretraining the base model (`voxloop pretrain corpus`).

Sentences come from the Debian fortunes files; espeak-ng and flite read them in many voices. The
output directory holds one WAV per utterance (16 kHz mono int16) and one JSON-lines manifest per
split, plus `corpus.json`, a summary written last (its presence means the build finished):

    corpus/
      corpus.json
      train.jsonl  dev.jsonl  test.jsonl  test_heldout_espeak.jsonl  test_heldout_flite.jsonl
      train/train-000000-0.wav ...

Each manifest line: {"id", "path" (relative to the corpus dir), "text" (normalized), "raw_text",
"voice" ("espeak-ng:en-us+m3" or "flite:slt"), "duration_s", "split"}.

Splits are disjoint by sentence. `test` reads test sentences in training voices; the two held-out
test splits read the same test sentences in one espeak-ng voice and one flite voice that train and
dev never use. Everything (sentence order, voice, speed and pitch of each utterance, audio bytes)
follows from the seed and the sentence index, never from worker scheduling.

The augmentation functions at the bottom (`speed_perturb`, `add_noise`, `add_reverb`) are pure
tensor functions the trainer applies on the fly.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import multiprocessing
import random
import re
import subprocess
import tempfile
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF
from tqdm import tqdm
from voxloop.core.pcm import float_to_int16
from voxloop.core.text import normalize_text, spell_out

from .config import CorpusConfig

logger = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16000
SPLITS = ("train", "dev", "test", "test_heldout_espeak", "test_heldout_flite")
TRAINING_VOICE_SPLITS = ("train", "dev", "test")


_ATTRIBUTION_LINE = re.compile(r"^\s*(--|\u2014|\u2015|-\s)")
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s+[\"'(\[]*[A-Z])")
_URL = re.compile(r"https?:|www\.|@|\.(com|org|net|edu|gov)\b", re.IGNORECASE)
_SHOUTING_OR_ACRONYM = re.compile(r"\b[A-Z]{2,}")
_ABBREVIATION = re.compile(
    r"(?:^|\s)[\"'(]*(?:mr|mrs|ms|dr|st|jr|sr|vs|etc|prof|no|co|inc|ltd|mt|gen|col|lt|sgt|capt|rev|"
    r"vol|ch|pp|ft|oz|lbs?|e\.g|i\.e|[a-z])\.",
    re.IGNORECASE,
)
# Characters a synthesizer reads the way the normalized transcript says: letters, apostrophes and
# punctuation that only shapes prosody. Anything else ("/", "*", "+", "#", other scripts) is either
# read aloud as a word the transcript lacks or not speakable at all, so its sentence is dropped.
_SPEAKABLE_CHARS = frozenset(" 'abcdefghijklmnopqrstuvwxyz.,;:!?\"()-")
_TTS_PUNCTUATION = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})




@dataclass(frozen=True)
class Utterance:
    """One line of a split manifest."""

    id: str
    path: Path
    """Absolute path of the WAV after `load_manifest` (the manifest stores it relative to the corpus dir)."""
    text: str
    """Normalized transcript (see voxloop.core.text.normalize_text)."""
    raw_text: str
    """The sentence as the fortunes file has it."""
    voice: str
    """"espeak-ng:LANGUAGE[+VARIANT]" or "flite:VOICE"."""
    duration_s: float
    split: str


@dataclass(frozen=True)
class Sentence:
    """A fortune sentence as written and as normalized."""

    raw: str
    text: str


@dataclass(frozen=True)
class _Job:
    """Everything one worker needs to render one utterance, fixed before any worker starts."""

    utt_id: str
    split: str
    sentence: Sentence
    engine: Literal["espeak-ng", "flite"]
    voice: str
    rate: float
    """espeak-ng words per minute, or flite duration_stretch."""
    pitch: int
    """espeak-ng pitch; unused by flite."""
    wav_path: Path
    max_duration_s: float
    max_edge_silence_s: float

    @property
    def voice_id(self) -> str:
        return f"{self.engine}:{self.voice}"


# ---------------------------------------------------------------------------------------------
# Sentences


def _read_fortune_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    # Overstrike sequences (char, backspace, char) render bold/underline on terminals; keep the last.
    return re.sub(r".\x08", "", text)


def _fortunes(fortunes_dir: Path) -> Iterator[str]:
    files = sorted(p for p in fortunes_dir.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8"))
    if not files:
        raise FileNotFoundError(f"no fortunes files in {fortunes_dir}; apt-get install fortune-mod fortunes")
    for path in files:
        for fortune in re.split(r"^%\s*$", _read_fortune_file(path), flags=re.MULTILINE):
            lines = []
            for line in fortune.splitlines():
                if _ATTRIBUTION_LINE.match(line):
                    break  # the attribution and anything after it is not part of the quote
                lines.append(line.strip())
            yield " ".join(line for line in lines if line)


def split_sentences(text: str) -> list[str]:
    """Split running text at . ! ? followed by whitespace and a capital letter."""
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def tts_text(raw: str) -> str:
    """What the synthesizer reads for `raw`: numbers and symbols spelled out as in the transcript."""
    return " ".join(spell_out(raw.translate(_TTS_PUNCTUATION)).split())


def _sentence_problem(raw: str) -> str | None:
    """Why `raw` is unfit for the corpus whatever its length, or None."""
    if not raw.endswith((".", "!", "?", '."', '!"', '?"', ".'", "!'", "?'")):
        return "fragment"
    if "--" in raw or "\u2014" in raw or "\u2015" in raw or " - " in raw:
        return "attribution dash"
    if _URL.search(raw):
        return "url"
    if _SHOUTING_OR_ACRONYM.search(raw):
        return "all caps"
    non_space = [c for c in raw if not c.isspace()]
    if sum(c.isdigit() for c in non_space) > 0.2 * len(non_space):
        return "digits"
    if _ABBREVIATION.search(raw):
        return "abbreviation"
    spoken = "".join(
        c for c in unicodedata.normalize("NFKD", tts_text(raw).lower()) if not unicodedata.combining(c)
    )
    if not set(spoken) <= _SPEAKABLE_CHARS:
        return "unspeakable characters"
    return None


def load_sentences(config: CorpusConfig) -> list[Sentence]:
    """Distinct usable fortune sentences, shuffled with `config.seed`, at most `num_sentences`."""
    seen: set[str] = set()
    sentences: list[Sentence] = []
    problems: Counter[str] = Counter()
    for fortune in _fortunes(config.fortunes_dir):
        for raw in split_sentences(fortune):
            problem = _sentence_problem(raw)
            text = normalize_text(raw) if problem is None else ""
            if problem is None and not config.min_words <= len(text.split()) <= config.max_words:
                problem = "length"
            if problem is None and text in seen:
                problem = "duplicate"
            if problem is not None:
                problems[problem] += 1
                continue
            seen.add(text)
            sentences.append(Sentence(raw=raw, text=text))
    logger.info("%d usable sentences; dropped %s", len(sentences), dict(problems.most_common()))
    random.Random(config.seed).shuffle(sentences)
    if len(sentences) < config.num_sentences:
        logger.warning("only %d sentences available, fewer than num_sentences=%d",
                       len(sentences), config.num_sentences)  # fmt: skip
    return sentences[: config.num_sentences]


# ---------------------------------------------------------------------------------------------
# Jobs: every random choice is made here, from (seed, split, sentence index, reading)


def _plan_jobs(config: CorpusConfig, sentences: list[Sentence]) -> list[_Job]:
    n = len(sentences)
    n_dev = max(1, round(config.dev_fraction * n))
    n_test = max(1, round(config.test_fraction * n))
    n_train = n - n_dev - n_test
    if n_train < 1:
        raise ValueError(f"{n} sentences leave none for train; raise num_sentences")
    ranges = {
        "train": range(0, n_train),
        "dev": range(n_train, n_train + n_dev),
        "test": range(n_train + n_dev, n),
        "test_heldout_espeak": range(n_train + n_dev, n),
        "test_heldout_flite": range(n_train + n_dev, n),
    }
    jobs = []
    for split_code, split in enumerate(SPLITS):
        readings = config.train_utterances_per_sentence if split == "train" else 1
        for index in ranges[split]:
            rng = np.random.default_rng([config.seed, split_code, index])
            engines = _pick_engines(config, split, readings, rng)
            for reading, (engine, voice) in enumerate(engines):
                utt_id = f"{split}-{index:06d}-{reading}"
                if engine == "espeak-ng":
                    rate = float(rng.integers(config.espeak_speed_wpm[0], config.espeak_speed_wpm[1] + 1))
                    pitch = int(rng.integers(config.espeak_pitch[0], config.espeak_pitch[1] + 1))
                else:
                    rate = round(float(rng.uniform(*config.flite_duration_stretch)), 3)
                    pitch = 0
                jobs.append(_Job(
                    utt_id=utt_id, split=split, sentence=sentences[index], engine=engine, voice=voice,
                    rate=rate, pitch=pitch, wav_path=config.out_dir / split / f"{utt_id}.wav",
                    max_duration_s=config.max_duration_s, max_edge_silence_s=config.max_edge_silence_s,
                ))  # fmt: skip
    return jobs


def _pick_engines(
    config: CorpusConfig, split: str, readings: int, rng: np.random.Generator
) -> list[tuple[Literal["espeak-ng", "flite"], str]]:
    """(engine, voice) for each reading of one sentence; distinct voices across readings."""
    if split == "test_heldout_espeak":
        return [("espeak-ng", config.heldout_espeak_voice)]
    if split == "test_heldout_flite":
        return [("flite", config.heldout_flite_voice)]
    picks: list[tuple[Literal["espeak-ng", "flite"], str]] = []
    languages = list(config.training_espeak_languages)
    flite_voices = list(config.training_flite_voices)
    for _ in range(readings):
        if rng.random() < config.flite_fraction:
            voice = flite_voices.pop(int(rng.integers(len(flite_voices))))
            picks.append(("flite", voice))
        else:
            language = languages.pop(int(rng.integers(len(languages))))
            variants = config.training_espeak_variants
            variant = variants[int(rng.integers(len(variants)))]
            picks.append(("espeak-ng", f"{language}+{variant}" if variant else language))
    return picks


# ---------------------------------------------------------------------------------------------
# Synthesis (runs in worker processes)


def _synthesize_raw(job: _Job, wav_path: Path) -> None:
    text = tts_text(job.sentence.raw)
    if job.engine == "espeak-ng":
        cmd = ["espeak-ng", "-v", job.voice, "-s", str(int(job.rate)), "-p", str(job.pitch),
               "-w", str(wav_path), "--", text]  # fmt: skip
    else:
        cmd = ["flite", "-voice", job.voice, "--setf", f"duration_stretch={job.rate}",
               "-o", str(wav_path), "-t", text]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def trim_silence(wave: torch.Tensor, max_edge_silence_s: float, sample_rate_hz: int = SAMPLE_RATE_HZ,
                 threshold_db: float = -40.0) -> torch.Tensor:  # fmt: skip
    """Cut leading/trailing silence to at most `max_edge_silence_s`; (T,) -> (T',).

    Silence is any 10 ms frame whose RMS is `threshold_db` below the loudest frame's.
    """
    frame = sample_rate_hz // 100
    n_frames = wave.shape[-1] // frame
    if n_frames == 0:
        return wave
    rms = wave[: n_frames * frame].reshape(n_frames, frame).pow(2).mean(dim=1).sqrt()  # (n_frames,)
    voiced = torch.nonzero(rms > rms.max() * 10 ** (threshold_db / 20)).flatten()
    if voiced.numel() == 0:
        return wave[:0]
    keep = round(max_edge_silence_s * sample_rate_hz)
    start = max(0, int(voiced[0]) * frame - keep)
    end = min(wave.shape[-1], (int(voiced[-1]) + 1) * frame + keep)
    return wave[start:end]


def _render(job: _Job) -> tuple[str, float | None, str | None]:
    """Synthesize, resample to 16 kHz, trim and write one utterance: (id, duration_s, problem)."""
    with tempfile.TemporaryDirectory(prefix="voxloop-tts-") as tmp:
        raw_path = Path(tmp) / "raw.wav"
        try:
            _synthesize_raw(job, raw_path)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            stderr = getattr(error, "stderr", b"") or b""
            return job.utt_id, None, f"{job.engine} failed: {error}; {stderr.decode(errors='replace')[-200:]}"
        audio, rate_hz = soundfile.read(raw_path, dtype="float32", always_2d=True)  # (T, C)
    wave = torch.from_numpy(audio.mean(axis=1))  # (T,)
    if rate_hz != SAMPLE_RATE_HZ:
        wave = AF.resample(wave, rate_hz, SAMPLE_RATE_HZ)
    wave = trim_silence(wave, job.max_edge_silence_s)
    duration_s = wave.shape[-1] / SAMPLE_RATE_HZ
    if duration_s == 0:
        return job.utt_id, None, "silent"
    if duration_s > job.max_duration_s:
        return job.utt_id, None, "too long"
    pcm = float_to_int16(wave.numpy())
    job.wav_path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(job.wav_path, pcm, SAMPLE_RATE_HZ, subtype="PCM_16")
    return job.utt_id, duration_s, None


def _init_worker() -> None:
    # One thread per process: the pool is the parallelism, and fixed threading keeps resampling
    # bit-identical however many workers there are.
    torch.set_num_threads(1)


def _render_all(jobs: list[_Job], workers: int) -> Iterator[tuple[str, float | None, str | None]]:
    progress = dict(total=len(jobs), desc="synthesizing", unit="utt", smoothing=0.05)
    if workers == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield from tqdm(map(_render, jobs), **progress)
        finally:
            torch.set_num_threads(threads)
        return
    # spawn, not fork: a forked child of a process that already ran torch ops can deadlock in OpenMP.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker
    ) as pool:
        yield from tqdm(pool.map(_render, jobs, chunksize=8), **progress)


# ---------------------------------------------------------------------------------------------
# Manifests


def manifest_path(corpus_dir: Path, split: str) -> Path:
    """Where `build_corpus` writes the manifest of `split`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    return Path(corpus_dir) / f"{split}.jsonl"


def load_manifest(path: Path) -> list[Utterance]:
    """The utterances of one split manifest, with WAV paths resolved against the manifest's directory."""
    path = Path(path)
    utterances = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            record["path"] = (path.parent / record["path"]).resolve()
            utterances.append(Utterance(**record))
    return utterances


def plan_subset(config: CorpusConfig, per_split: dict[str, int]) -> list[_Job]:
    """The first `per_split[split]` utterances of each split of `config`'s full plan, under config.out_dir.

    A small corpus that keeps the full corpus's sentence separation: its dev and test utterances read
    sentences the full corpus (and so a model trained on it) never trained on. For build_corpus(jobs=...).
    """
    unknown = set(per_split) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; splits are {SPLITS}")
    plan = _plan_jobs(config, load_sentences(config))
    return [job for split, count in per_split.items() for job in [j for j in plan if j.split == split][:count]]


def build_corpus(config: CorpusConfig, jobs: list[_Job] | None = None) -> Path:
    """Synthesize the corpus described by `config` (or only `jobs` of it, see plan_subset); returns its directory."""
    out_dir = config.out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"out_dir {out_dir} is not empty; remove it or choose another directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. Sentences and the full plan of who reads what.
    sentences = load_sentences(config)
    jobs = _plan_jobs(config, sentences) if jobs is None else jobs
    logger.info("synthesizing %d utterances of %d sentences with %d workers",
                len(jobs), len(sentences), config.workers)  # fmt: skip

    # 2. Synthesis; results come back in job order whatever the scheduling.
    started = time.monotonic()
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    dropped: Counter[str] = Counter()
    for job, (utt_id, duration_s, problem) in zip(jobs, _render_all(jobs, config.workers), strict=True):
        if problem is not None:
            dropped[problem.split(":")[0]] += 1
            if "failed" in problem:
                logger.warning("%s: %s", utt_id, problem)
            continue
        records[job.split].append({
            "id": utt_id, "path": job.wav_path.relative_to(config.out_dir).as_posix(),
            "text": job.sentence.text, "raw_text": job.sentence.raw, "voice": job.voice_id,
            "duration_s": round(duration_s, 4), "split": job.split,
        })  # fmt: skip
    elapsed_s = time.monotonic() - started
    logger.info("synthesized %d utterances in %.0f s (%.1f utt/s); dropped %s",
                len(jobs), elapsed_s, len(jobs) / max(elapsed_s, 1e-9), dict(dropped))  # fmt: skip
    failed = sum(n for reason, n in dropped.items() if "failed" in reason)
    if failed > 0.01 * len(jobs):
        raise RuntimeError(f"{failed} of {len(jobs)} syntheses failed; see the warnings above")

    # 3. Manifests, then the summary that marks the corpus complete.
    for split, split_records in records.items():
        with manifest_path(out_dir, split).open("w", encoding="utf-8") as f:
            for record in split_records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary = _summary(config, len(sentences), records, dropped)
    (out_dir / "corpus.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    for split in SPLITS:
        logger.info("%-20s %6d utterances %6.2f h %3d voices", split,
                    summary["utterances"][split], summary["hours"][split],
                    len(summary["voices"][split]))  # fmt: skip
    return out_dir


def _summary(config: CorpusConfig, num_sentences: int, records: dict[str, list[dict]],
             dropped: Counter[str]) -> dict:  # fmt: skip
    config_dict = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}
    return {
        "config": config_dict,
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "sentences": {
            "total": num_sentences,
            **{split: len({r["text"] for r in rs}) for split, rs in records.items()},
        },
        "utterances": {split: len(rs) for split, rs in records.items()},
        "hours": {split: round(sum(r["duration_s"] for r in rs) / 3600, 3) for split, rs in records.items()},
        "voices": {
            split: dict(sorted(Counter(r["voice"] for r in rs).items())) for split, rs in records.items()
        },
        "heldout_voices": {
            "test_heldout_espeak": f"espeak-ng:{config.heldout_espeak_voice}",
            "test_heldout_flite": f"flite:{config.heldout_flite_voice}",
        },
        "dropped_utterances": dict(sorted(dropped.items())),
    }


# ---------------------------------------------------------------------------------------------
# Augmentation: pure functions on float waveforms (..., T) at SAMPLE_RATE_HZ


def _check_float(wave: torch.Tensor) -> None:
    if not wave.is_floating_point():
        raise ValueError(
            f"wave must be a float tensor in [-1, 1], got {wave.dtype}; use wave.float() / 32768"
        )


def speed_perturb(wave: torch.Tensor, factor: float) -> torch.Tensor:
    """Play `wave` `factor` times faster (pitch shifts with it, as in Kaldi's speed perturbation).

    (..., T) -> (..., ~T / factor). Resample trick: pretend the audio was recorded at
    factor * rate and resample it to rate. https://www.isca-archive.org/interspeech_2015/ko15_interspeech.html
    """
    _check_float(wave)
    if not 0.5 <= factor <= 2.0:
        raise ValueError(f"factor must be in [0.5, 2.0], got {factor}; typical values are 0.9, 1.0, 1.1")
    # Rates in hundredths keep the polyphase filter small (gcd(90, 100) = 10, so 9 -> 10 phases).
    orig = round(factor * 100)
    if orig == 100:
        return wave.clone()
    return AF.resample(wave, orig, 100)


def _pink(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    white = torch.randn(shape, generator=generator)
    spectrum = torch.fft.rfft(white)
    freqs = torch.arange(spectrum.shape[-1], dtype=torch.float32)
    freqs[0] = 1.0  # no infinite DC gain
    return torch.fft.irfft(spectrum / freqs.sqrt(), n=shape[-1])  # power ~ 1/f


def add_noise(wave: torch.Tensor, snr_db: float, generator: torch.Generator,
              color: Literal["white", "pink"] = "white") -> torch.Tensor:  # fmt: skip
    """`wave` plus white or pink noise scaled to exactly `snr_db` over the last axis; (..., T) -> (..., T)."""
    _check_float(wave)
    if color not in ("white", "pink"):
        raise ValueError(f"color must be 'white' or 'pink', got {color!r}")
    shape = tuple(wave.shape)
    noise = torch.randn(shape, generator=generator) if color == "white" else _pink(shape, generator)
    noise = noise.to(wave.dtype)
    signal_power = wave.pow(2).mean(dim=-1, keepdim=True)
    noise_power = noise.pow(2).mean(dim=-1, keepdim=True).clamp_min(1e-20)
    scale = (signal_power / (noise_power * 10 ** (snr_db / 10))).sqrt()
    return wave + scale * noise


def synthetic_impulse_response(rt60_s: float, generator: torch.Generator,
                               sample_rate_hz: int = SAMPLE_RATE_HZ) -> torch.Tensor:  # fmt: skip
    """Unit-energy room impulse response: a direct path then exponentially decaying noise; (L,).

    The envelope falls by 60 dB over `rt60_s` (Sabine's definition of reverberation time).
    """
    if not 0 < rt60_s <= 2.0:
        raise ValueError(f"rt60_s must be in (0, 2], got {rt60_s}; rooms are typically 0.2..0.8 s")
    length = max(2, round(rt60_s * sample_rate_hz))
    t_s = torch.arange(length, dtype=torch.float32) / sample_rate_hz
    envelope = torch.exp(-3 * math.log(10) * t_s / rt60_s)  # amplitude 10^-3 (-60 dB) at rt60
    response = torch.randn(length, generator=generator) * envelope
    response[0] = 1.0  # direct path
    return response / response.norm()


def add_reverb(wave: torch.Tensor, rt60_s: float, generator: torch.Generator,
               sample_rate_hz: int = SAMPLE_RATE_HZ) -> torch.Tensor:  # fmt: skip
    """Convolve `wave` with a synthetic room response, keeping its length and RMS; (..., T) -> (..., T)."""
    _check_float(wave)
    response = synthetic_impulse_response(rt60_s, generator, sample_rate_hz).to(wave.dtype)
    wet = AF.fftconvolve(wave, response.expand(*wave.shape[:-1], -1))[..., : wave.shape[-1]]
    rms_in = wave.pow(2).mean(dim=-1, keepdim=True).sqrt()
    rms_out = wet.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
    return wet * (rms_in / rms_out)


__all__ = [
    "SAMPLE_RATE_HZ",
    "SPLITS",
    "Sentence",
    "Utterance",
    "add_noise",
    "add_reverb",
    "build_corpus",
    "load_manifest",
    "load_sentences",
    "manifest_path",
    "speed_perturb",
    "split_sentences",
    "synthetic_impulse_response",
    "trim_silence",
    "tts_text",
]
