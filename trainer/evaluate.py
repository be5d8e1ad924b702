"""Evaluation: WER and CER of a policy (torch checkpoint or exported ONNX) on a manifest.

Both backends produce per-frame log-probs that go through the same greedy CTC decoding
(`core.decoder.greedy_ctc_text`), so their figures are comparable. An exported graph runs as the server
runs it (`core.model.OnnxModel`); `lm_transcriber` decodes its log-probs with the server's lexicon + LM
beam search instead (a version's card["decoder"]).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import jiwer
import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from ..core.decoder import greedy_ctc_text
from ..core.model import MODEL_SAMPLE_RATE_HZ, WINDOWED_CTC_FORMAT, OnnxModel
from ..core.pcm import read_wav
from .model import VoxloopForCTC

log = logging.getLogger(__name__)

Transcriber = Callable[[np.ndarray], str]  # float32 16 kHz samples -> transcript


@dataclass(frozen=True)
class UtteranceResult:
    id: str
    reference: str
    hypothesis: str
    voice: str


@dataclass(frozen=True)
class EvalSummary:
    utterances: int
    wer: float
    cer: float

    def as_dict(self) -> dict:
        return {"utterances": self.utterances, "wer": self.wer, "cer": self.cer}


def error_rates(references: list[str], hypotheses: list[str]) -> EvalSummary:
    """Corpus-level WER and CER (errors summed over utterances / reference length summed)."""
    if not references:
        return EvalSummary(0, float("nan"), float("nan"))
    return EvalSummary(
        utterances=len(references),
        wer=float(jiwer.wer(references, hypotheses)),
        cer=float(jiwer.cer(references, hypotheses)),
    )


def torch_transcriber(model: VoxloopForCTC) -> Transcriber:
    model = model.eval()

    def transcribe(samples: np.ndarray) -> str:
        with torch.no_grad():
            logits = model(torch.from_numpy(samples)[None]).logits[0]
        return greedy_ctc_text(torch.log_softmax(logits, -1).numpy(), model.config.vocabulary)

    return transcribe


def onnx_log_probs(onnx_path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], OnnxModel]:
    """The log-probs (T, V) of an exported model for float32 16 kHz samples, and the loaded graph.

    A streaming-ctc/1 graph is causal: one pass over the whole utterance from a fresh state gives what
    the stream's chunks give. A windowed-ctc/1 graph attends over its audio history, not the utterance:
    it is fed the windows a server stream feeds (the tail too, if it holds a frame), state carried."""
    graph = OnnxModel(onnx_path, intra_op_threads=1)
    spec = graph.spec

    def forward(samples: np.ndarray) -> np.ndarray:
        if spec.format != WINDOWED_CTC_FORMAT:
            return graph.run(samples[None], graph.initial_state(1))[0][0]
        state, pieces = graph.initial_state(1), []
        for start, end in spec.windows(len(samples)):
            log_probs, state = graph.run(samples[None, start:end], state)
            pieces.append(log_probs[0])
        return np.concatenate(pieces) if pieces else np.zeros((0, len(spec.vocabulary)), np.float32)

    return forward, graph


def onnx_transcriber(onnx_path: Path) -> Transcriber:
    forward, graph = onnx_log_probs(onnx_path)
    return lambda samples: greedy_ctc_text(forward(samples), graph.spec.vocabulary)


def lm_transcriber(onnx_path: Path, decoder_dir: Path, settings: dict | None = None) -> Transcriber:
    """The exported model with the server's lexicon + LM beam search (card["decoder"] of decoder_dir).

    `settings` override the card's search knobs (e.g. {"lm_weight": 1.0} while tuning on dev).
    """
    from ..core.lm_decoder import LexiconLmDecoderFactory, lm_decoder_paths

    forward, graph = onnx_log_probs(onnx_path)
    spec = graph.spec
    card = json.loads((decoder_dir / "card.json").read_text())
    lexicon, lm, beam = lm_decoder_paths(card, decoder_dir, overrides=settings)
    factory = LexiconLmDecoderFactory(spec.vocabulary, spec.frame_shift_s, lexicon, lm, beam)

    def transcribe(samples: np.ndarray) -> str:
        decoder = factory()
        decoder.feed(forward(samples), 0.0)
        return decoder.final_hypotheses(1)[0].transcript

    return transcribe


def second_pass_transcriber(version_dir: Path) -> Transcriber | None:
    """A two-pass (Whisper) version's finals, exactly as the server decodes them (its second pass on the
    whole utterance); None for a version without a second pass."""
    from ..core.whisper_decoder import WhisperSecondPass

    card = json.loads((Path(version_dir) / "card.json").read_text())
    second_pass = WhisperSecondPass.from_card(card, Path(version_dir))
    if second_pass is None:
        return None
    return lambda samples: second_pass.transcribe(samples)[0].transcript


def version_transcriber(version_dir: Path) -> Transcriber:
    """A version directory's finals as the server decodes them: its second pass (Whisper), its lexicon + LM
    beam search (card["decoder"]), or greedy CTC."""
    version_dir = Path(version_dir)
    card = json.loads((version_dir / "card.json").read_text())
    if (second_pass := second_pass_transcriber(version_dir)) is not None:
        return second_pass
    if card.get("decoder"):
        return lm_transcriber(version_dir / "model.onnx", version_dir)
    return onnx_transcriber(version_dir / "model.onnx")


def load_samples(path: Path) -> np.ndarray:
    """An evaluation manifest's audio as float32 (S,) mono at 16 kHz; a recording at another rate (the real-speech
    clips) is resampled (torchaudio's sinc interpolation)."""
    if sf.info(str(path)).samplerate == MODEL_SAMPLE_RATE_HZ:
        return read_wav(path, MODEL_SAMPLE_RATE_HZ)
    import torchaudio.functional as AF

    audio, rate_hz = sf.read(str(path), dtype="float32", always_2d=True)  # (S, C)
    return AF.resample(torch.from_numpy(audio.mean(axis=1)), rate_hz, MODEL_SAMPLE_RATE_HZ).numpy()


def evaluate(
    transcribe: Transcriber, utterances: Iterable[dict], corpus_dir: Path, *, progress: bool = True
) -> tuple[EvalSummary, dict[str, EvalSummary], list[UtteranceResult]]:
    """Transcribe every manifest row; return the overall summary, one per voice, and each result."""
    rows = list(utterances)
    results = []
    for row in tqdm(rows, desc="eval", unit="utt", disable=not progress):
        hypothesis = transcribe(load_samples(corpus_dir / row["path"]))
        results.append(UtteranceResult(row["id"], row["text"], hypothesis, row.get("voice", "")))
    overall = error_rates([r.reference for r in results], [r.hypothesis for r in results])
    per_voice = {}
    for voice in sorted({r.voice for r in results}):
        mine = [r for r in results if r.voice == voice]
        per_voice[voice] = error_rates([r.reference for r in mine], [r.hypothesis for r in mine])
    return overall, per_voice, results
