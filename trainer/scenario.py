"""The adaptation scenario: a deployment domain the base model never saw, for the bench, the demo and tests.

The "deployment" is a warehouse voice assistant ("dispatch four pallets of zentrova to the ulmoor
depot"). Its sentences are built from templates whose carrier words are common words of the base
corpus, plus TARGET_WORDS: invented product and place names and logistics jargon that no base
transcript contains (tests check this against the sentences `corpus.load_sentences` picks). They are
read by DEPLOYMENT_VOICES, voices the base corpus held out of training: the held-out espeak-ng
language with other variants, training languages with the held-out variant, and the held-out flite
voice. The scenario directory holds one WAV per utterance (16 kHz mono int16) and a manifest per
split in the corpus's format (see `corpus.load_manifest`), plus `scenario.json`, written last:

    scenario/
      scenario.json  feedback.jsonl  test.jsonl  anchor.jsonl
      feedback/feedback-0000.wav ...

- `feedback`: the stream users talk to the server and correct (>= 128 utterances);
- `test`: held-out domain sentences (never in `feedback`), same voices and target words;
- `anchor`: the first utterances of the base corpus's own `test` split (fortune sentences in training
  voices), re-synthesized exactly as `voxloop pretrain corpus` makes them, so no corpus directory is
  needed: what adaptation must not forget.

Every target word appears in both feedback and test. Target-word accuracy (`target_word_accuracy`):
of the target words in the references, the share the hypothesis has at the aligned position.
Everything follows from the seed, never from worker scheduling.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import jiwer
import numpy as np

from .config import CorpusConfig
from .corpus import (
    Sentence,
    Utterance,
    _Job,  # the corpus's own render plan and worker pool: one copy of synthesis, resampling and trimming
    _plan_jobs,
    _render_all,
    load_manifest,
    load_sentences,
)

logger = logging.getLogger(__name__)

SCENARIO_SPLITS = ("feedback", "test", "anchor")
SUMMARY_FILE = "scenario.json"
SCENARIO_FORMAT = "voxloop-scenario/1"

PRODUCTS = ("zentrova", "kalimbrex", "vortiqa", "dravenix", "quillet", "morphane", "sylvatek", "brixa",
            "tormalyn", "ozbrek", "nuvell", "plaxo")
"""Invented product names."""
PLACES = ("kestrahaven", "ulmoor", "brennadoc", "valtoria", "zimmerfeld", "castellvy", "orlumbe", "drossmere",
          "pexford", "wyndelhurst")
"""Invented place names."""
JARGON = ("crates", "pallets", "depot", "warehouse", "dispatch", "reroute", "cancel", "shipment")
"""Logistics words the fortunes never use."""
TARGET_WORDS = frozenset(PRODUCTS + PLACES + JARGON)
"""The words the base model never heard: what target-word accuracy counts."""

# {product} and {place} come round-robin (so each appears in every split), {place2} differs from {place},
# {count} and {day} are drawn. Every other word is a word of the base corpus's training transcripts.
TEMPLATES = (
    "dispatch {count} pallets of {product} to the {place} depot",
    "send {count} crates of {product} to {place}",
    "reroute the {product} shipment from {place} to {place2}",
    "cancel the {product} order for the {place} warehouse",
    "how many crates of {product} are left in {place}",
    "move the {product} pallets from the {place} depot to the warehouse",
    "is the {place} warehouse out of {product}",
    "please dispatch the {product} crates to {place} by {day}",
    "check the stock of {product} at the {place} depot",
    "the {product} shipment to {place} is late",
    "we need {count} more pallets of {product} in {place} {day}",
    "when will the {product} crates arrive at the {place} warehouse",
)
COUNTS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "twenty")
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "today", "tonight", "tomorrow")

DEPLOYMENT_VOICES: tuple[tuple[str, str], ...] = (
    ("espeak-ng", "en-gb-x-gbcwmd+m2"),
    ("espeak-ng", "en-gb-x-gbcwmd+f3"),
    ("espeak-ng", "en-gb-x-gbcwmd+klatt3"),
    ("espeak-ng", "en-us+f3"),
    ("espeak-ng", "en-gb-scotland+f3"),
    ("flite", "rms"),
)
"""(engine, voice): each is held out of base training, in its language, its variant or as a flite voice."""


@dataclass(frozen=True)
class ScenarioConfig:
    """How `build_scenario` builds the adaptation scenario."""

    out_dir: Path
    """Directory the scenario is written to; must be empty, not exist yet, or hold this very scenario."""
    seed: int = 0
    """Seeds the domain sentences and every utterance's voice, speed and pitch."""
    feedback_utterances: int = 144
    """Utterances of the feedback stream (the bench corrects up to 128 of them)."""
    test_utterances: int = 80
    """Held-out domain utterances: new sentences in the same voices."""
    anchor_utterances: int = 60
    """Base-corpus test utterances (training voices, fortune sentences) to measure forgetting on."""
    workers: int = 2
    """Synthesis processes; 1 synthesizes in this process."""
    fortunes_dir: Path = Path("/usr/share/games/fortunes")
    """Where the base corpus's sentences come from (for the anchor split)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "fortunes_dir", Path(self.fortunes_dir))
        for name in ("feedback_utterances", "test_utterances"):
            if getattr(self, name) < max(len(PRODUCTS), len(PLACES)):
                raise ValueError(f"{name} must be at least {max(len(PRODUCTS), len(PLACES))} so that every "
                                 f"product and place name appears in it")
        if self.anchor_utterances < 1:
            raise ValueError(f"anchor_utterances must be >= 1, got {self.anchor_utterances}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    def corpus_config(self) -> CorpusConfig:
        """The base corpus's config (`voxloop pretrain corpus` defaults): its voices, rates and test split."""
        return CorpusConfig(out_dir=self.out_dir, fortunes_dir=self.fortunes_dir)

    def summary_config(self) -> dict:
        """What identifies the scenario's content (not where or how fast it is built)."""
        return {"seed": self.seed, "feedback_utterances": self.feedback_utterances,
                "test_utterances": self.test_utterances, "anchor_utterances": self.anchor_utterances}


@dataclass(frozen=True)
class Scenario:
    """A built scenario: its three splits (absolute WAV paths) and the target words."""

    directory: Path
    feedback: tuple[Utterance, ...]
    test: tuple[Utterance, ...]
    anchor: tuple[Utterance, ...]
    target_words: frozenset[str]


@dataclass(frozen=True)
class TargetWordScore:
    """Target words of the references found at their aligned position in the hypotheses."""

    hits: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.hits / self.total if self.total else float("nan")


# ---------------------------------------------------------------------------------------------
# Sentences


def _sentence(template: str, rng: np.random.Generator, product: str, place: str) -> Sentence:
    others = [p for p in PLACES if p != place]
    text = template.format(product=product, place=place, place2=others[int(rng.integers(len(others)))],
                           count=COUNTS[int(rng.integers(len(COUNTS)))], day=DAYS[int(rng.integers(len(DAYS)))])
    return Sentence(raw=text[0].upper() + text[1:] + ".", text=text)


def domain_sentences(seed: int, counts: dict[str, int]) -> dict[str, list[Sentence]]:
    """Distinct domain sentences per split (`counts`: split -> number); no sentence is in two splits.

    Products and places go round-robin over a per-split shuffle, so a split of at least
    max(len(PRODUCTS), len(PLACES)) sentences has every one of them; templates, counts and days are drawn.
    """
    used: set[str] = set()
    out: dict[str, list[Sentence]] = {}
    for split_code, (split, n) in enumerate(counts.items()):
        rng = np.random.default_rng([seed, 1000 + split_code])
        products = [PRODUCTS[i] for i in rng.permutation(len(PRODUCTS))]
        places = [PLACES[i] for i in rng.permutation(len(PLACES))]
        sentences = []
        for k in range(n):
            product, place = products[k % len(products)], places[k % len(places)]
            for _ in range(1000):  # templates x counts x days leave thousands of sentences per pair
                sentence = _sentence(TEMPLATES[int(rng.integers(len(TEMPLATES)))], rng, product, place)
                if sentence.text not in used:
                    break
            else:
                raise ValueError(f"ran out of distinct sentences for {product}/{place}; ask for fewer utterances")
            used.add(sentence.text)
            sentences.append(sentence)
        out[split] = sentences
    return out


# ---------------------------------------------------------------------------------------------
# Plan and build


def plan_scenario(config: ScenarioConfig) -> list[_Job]:
    """Every utterance to render: domain splits in DEPLOYMENT_VOICES, then the anchor split."""
    corpus = config.corpus_config()
    sentences = domain_sentences(config.seed, {"feedback": config.feedback_utterances,
                                               "test": config.test_utterances})
    jobs = []
    for split_code, (split, split_sentences) in enumerate(sentences.items()):
        for index, sentence in enumerate(split_sentences):
            rng = np.random.default_rng([config.seed, 2000 + split_code, index])
            engine, voice = DEPLOYMENT_VOICES[int(rng.integers(len(DEPLOYMENT_VOICES)))]
            if engine == "espeak-ng":
                rate = float(rng.integers(corpus.espeak_speed_wpm[0], corpus.espeak_speed_wpm[1] + 1))
                pitch = int(rng.integers(corpus.espeak_pitch[0], corpus.espeak_pitch[1] + 1))
            else:
                rate, pitch = round(float(rng.uniform(*corpus.flite_duration_stretch)), 3), 0
            utt_id = f"{split}-{index:04d}"
            jobs.append(_Job(utt_id=utt_id, split=split, sentence=sentence, engine=engine, voice=voice,
                             rate=rate, pitch=pitch, wav_path=config.out_dir / split / f"{utt_id}.wav",
                             max_duration_s=corpus.max_duration_s, max_edge_silence_s=corpus.max_edge_silence_s))
    # The anchor: the base corpus's test split as its builder plans it (same sentence, voice, rate, pitch).
    base_test = [job for job in _plan_jobs(corpus, load_sentences(corpus)) if job.split == "test"]
    for index, job in enumerate(base_test[: config.anchor_utterances]):
        utt_id = f"anchor-{index:04d}"
        jobs.append(dataclasses.replace(job, utt_id=utt_id, split="anchor",
                                        wav_path=config.out_dir / "anchor" / f"{utt_id}.wav"))
    return jobs


def manifest_path(scenario_dir: Path, split: str) -> Path:
    if split not in SCENARIO_SPLITS:
        raise ValueError(f"unknown scenario split {split!r}; choose one of {SCENARIO_SPLITS}")
    return Path(scenario_dir) / f"{split}.jsonl"


def is_built(config: ScenarioConfig) -> bool:
    """Whether `config.out_dir` already holds the scenario `config` describes."""
    summary = config.out_dir / SUMMARY_FILE
    if not summary.is_file():
        return False
    document = json.loads(summary.read_text())
    return document.get("format") == SCENARIO_FORMAT and document.get("config") == config.summary_config()


def build_scenario(config: ScenarioConfig) -> Path:
    """Synthesize the scenario (or reuse it when `out_dir` already holds the same one); returns its directory."""
    out_dir = config.out_dir
    if is_built(config):
        logger.info("scenario already built in %s", out_dir)
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"out_dir {out_dir} holds something other than this scenario; remove it or choose "
                         f"another directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_scenario(config)
    logger.info("synthesizing %d scenario utterances with %d workers", len(jobs), config.workers)
    records: dict[str, list[dict]] = {split: [] for split in SCENARIO_SPLITS}
    for job, (utt_id, duration_s, problem) in zip(jobs, _render_all(jobs, config.workers), strict=True):
        if problem is not None:
            # A domain sentence is short and its voices known; any failure here is a broken install.
            raise RuntimeError(f"{utt_id}: {problem}; check `espeak-ng --version` and `flite -lv`")
        records[job.split].append({
            "id": utt_id, "path": job.wav_path.relative_to(out_dir).as_posix(), "text": job.sentence.text,
            "raw_text": job.sentence.raw, "voice": job.voice_id, "duration_s": round(duration_s, 4),
            "split": job.split,
        })
    for split, rows in records.items():
        with manifest_path(out_dir, split).open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = {
        "format": SCENARIO_FORMAT,
        "config": config.summary_config(),
        "target_words": sorted(TARGET_WORDS),
        "utterances": {split: len(rows) for split, rows in records.items()},
        "seconds": {split: round(sum(r["duration_s"] for r in rows), 1) for split, rows in records.items()},
        "voices": {split: dict(sorted(Counter(r["voice"] for r in rows).items())) for split, rows in records.items()},
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return out_dir


def load_scenario(scenario_dir: Path) -> Scenario:
    """A scenario `build_scenario` wrote."""
    scenario_dir = Path(scenario_dir)
    summary_path = scenario_dir / SUMMARY_FILE
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found; build the scenario first (voxloop scenario build)")
    summary = json.loads(summary_path.read_text())
    splits = {split: tuple(load_manifest(manifest_path(scenario_dir, split))) for split in SCENARIO_SPLITS}
    return Scenario(scenario_dir, splits["feedback"], splits["test"], splits["anchor"],
                    frozenset(summary["target_words"]))


# ---------------------------------------------------------------------------------------------
# Scoring


def target_word_accuracy(references: list[str], hypotheses: list[str],
                         target_words: frozenset[str] = TARGET_WORDS) -> TargetWordScore:
    """Target words of `references` that the word alignment with `hypotheses` marks as hits.

    The alignment is the one WER counts (jiwer's Levenshtein alignment), so a target word is right only
    where it stands in the hypothesis, not anywhere in it.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    hits = total = 0
    for reference, hypothesis in zip(references, hypotheses, strict=True):
        ref_words = reference.split()
        targets = [i for i, word in enumerate(ref_words) if word in target_words]
        if not targets:
            continue
        total += len(targets)
        if not hypothesis.split():
            continue
        (alignment,) = jiwer.process_words(reference, hypothesis).alignments
        matched = {i for chunk in alignment if chunk.type == "equal"
                   for i in range(chunk.ref_start_idx, chunk.ref_end_idx)}
        hits += sum(i in matched for i in targets)
    return TargetWordScore(hits, total)


__all__ = [
    "DEPLOYMENT_VOICES",
    "SCENARIO_SPLITS",
    "TARGET_WORDS",
    "TEMPLATES",
    "Scenario",
    "ScenarioConfig",
    "TargetWordScore",
    "build_scenario",
    "domain_sentences",
    "is_built",
    "load_scenario",
    "manifest_path",
    "plan_scenario",
    "target_word_accuracy",
]
