"""Warm-up of a freshly loaded model before it serves: run a probe utterance, check what comes out.

A version may carry a probe (`card["probe"] = {"file": "probe.wav", "transcript": "..."}`, the WAV
listed in `card["files"]` so its sha256 is verified with the model): the transcript is what the
exported graph produced for that audio at export time (`probe_card_entry`). Warm-up decodes the
probe the way a stream does (chunk by chunk, state carried, greedy CTC) and must reproduce that
transcript exactly: a model may legitimately change its output from version to version, but not
between its own export and its deployment, so a mismatch means a wrong or damaged graph.

Without a probe in the card (the shipped base model predates it), warm-up runs a fixed synthetic
signal and checks only that the graph runs, its log-probs are finite and normalized, and the
chunked decode yields the expected number of frames.

Warm-up also pays the first-call costs (memory arenas, lazy initialization) off the serving path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decoder import CtcGreedyDecoder
from .model import MODEL_SAMPLE_RATE_HZ, OnnxModel
from .pcm import read_wav
from .registry import VerificationError, version_file
from .whisper_decoder import WhisperSecondPass

log = logging.getLogger(__name__)

PROBE_CARD_KEY = "probe"
PROBE_FILE = "probe.wav"
SYNTHETIC_PROBE_S = 1.6
"""Length of the built-in probe signal (8 streaming chunks of the shipped model)."""
SYNTHETIC_PROBE_SEED = 20261125
NORMALIZATION_TOLERANCE = 1e-3
"""|logsumexp(log_probs) - 0| allowed per frame: the graph must end in a log-softmax."""


class WarmupFailed(Exception):
    """The model did not pass warm-up; `reason` is a metric label (warmup or probe_mismatch)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class WarmupReport:
    transcript: str
    """The model's transcript of the probe."""
    expected: str | None
    """The card's transcript of the probe; None when the card has no probe (synthetic signal)."""
    frames: int
    seconds: float
    """Wall time of the warm-up."""


def synthetic_probe() -> np.ndarray:
    """A fixed voiced-like signal with noise, float32 (S,) at 16 kHz."""
    t = np.arange(int(SYNTHETIC_PROBE_S * MODEL_SAMPLE_RATE_HZ)) / MODEL_SAMPLE_RATE_HZ
    tone = sum(np.sin(2 * np.pi * 140.0 * k * t) / k for k in range(1, 8))
    noise = np.random.default_rng(SYNTHETIC_PROBE_SEED).standard_normal(len(t))
    return (0.15 * tone + 0.02 * noise).astype(np.float32)


def read_probe(path: Path) -> np.ndarray:
    """A probe WAV as float32 (S,) at 16 kHz mono; raises WarmupFailed for anything else."""
    try:
        return read_wav(path, MODEL_SAMPLE_RATE_HZ)
    except ValueError as e:  # another rate
        raise WarmupFailed("warmup", f"probe {path.name}: {e}; probes are {MODEL_SAMPLE_RATE_HZ} Hz") from e
    except (OSError, RuntimeError) as e:  # soundfile's errors are RuntimeErrors
        raise WarmupFailed("warmup", f"probe {path.name} is unreadable: {e}") from e


def streaming_transcript(model: OnnxModel, audio: np.ndarray) -> tuple[str, int]:
    """Decode float32 (S,) 16 kHz audio chunk by chunk as a stream does; returns (transcript, frames).

    Raises WarmupFailed when a call fails or its log-probs are not finite, normalized (T, V) rows.
    """
    spec = model.spec
    decoder = CtcGreedyDecoder(spec.vocabulary, spec.frame_shift_s)
    state = model.initial_state(1)
    for start, end in spec.windows(len(audio)):  # the windows a stream feeds, the tail included
        try:
            log_probs, state = model.run(audio[None, start:end], state)  # (1, T, V)
        except Exception as e:  # onnxruntime's own error types: a graph that cannot run is refused
            raise WarmupFailed("warmup", f"the model failed on the probe: {type(e).__name__}: {e}") from e
        frames = log_probs[0]  # (T, V)
        expected_frames = spec.frames_for(end - start)
        if frames.ndim != 2 or frames.shape != (expected_frames, len(spec.vocabulary)):
            raise WarmupFailed("warmup", f"log_probs of a {end - start}-sample call have shape {frames.shape}, "
                                         f"expected ({expected_frames}, {len(spec.vocabulary)})")
        if not np.isfinite(frames).all():
            raise WarmupFailed("warmup", "the model's log_probs on the probe are not finite")
        total = np.logaddexp.reduce(frames, axis=-1)  # (T,): 0 for a log-softmax
        if np.abs(total).max(initial=0.0) > NORMALIZATION_TOLERANCE:
            raise WarmupFailed("warmup", f"the model's log_probs are not normalized (|logsumexp| up to "
                                         f"{np.abs(total).max():.3g}); the graph must end in a log-softmax")
        decoder.feed(frames, start / MODEL_SAMPLE_RATE_HZ)
    return decoder.hypothesis().finalized().transcript, decoder.frames


def warm_up(model: OnnxModel, card: dict, version_dir: Path,
            second_pass: WhisperSecondPass | None = None) -> WarmupReport:
    """Run the version's probe (or the synthetic one) through `model`; raises WarmupFailed.

    A two-pass version's probe entry also records the second pass's transcript ("final_transcript"),
    which its encoder and decoder graphs must reproduce."""
    began = time.perf_counter()
    probe = card.get(PROBE_CARD_KEY)
    if probe:
        if not isinstance(probe, dict) or not isinstance(probe.get("transcript"), str) or "file" not in probe:
            raise WarmupFailed("warmup", f"card[{PROBE_CARD_KEY!r}] must be {{'file': ..., 'transcript': ...}}")
        try:  # listed in the card's files (sha256-verified) and inside the version directory
            probe_path = version_file(version_dir, card, probe["file"])
        except VerificationError as e:
            raise WarmupFailed("warmup", f"the probe: {e}") from e
        audio, expected = read_probe(probe_path), probe["transcript"]
    else:
        audio, expected = synthetic_probe(), None
    transcript, frames = streaming_transcript(model, audio)
    if expected is not None and transcript != expected:
        raise WarmupFailed("probe_mismatch", f"the probe decodes to {transcript!r}, the card recorded {expected!r} "
                                             "at export: the graph is not the one that was exported")
    if second_pass is not None:
        expected_final = probe.get("final_transcript") if probe else None
        try:
            final = second_pass.transcribe(audio)[0].transcript
        except Exception as e:  # onnxruntime's own error types: graphs that cannot run are refused
            raise WarmupFailed("warmup", f"the second pass failed on the probe: {type(e).__name__}: {e}") from e
        if expected_final is not None and final != expected_final:
            raise WarmupFailed("probe_mismatch", f"the second pass decodes the probe to {final!r}, the card recorded "
                                                 f"{expected_final!r} at export: its graphs are not the exported ones")
    report = WarmupReport(transcript, expected, frames, time.perf_counter() - began)
    log.info("warm-up of %s: %d frames in %.0f ms, probe transcript %r%s", model.spec.version, frames,
             report.seconds * 1000, transcript, " (matches the card)" if expected is not None else "")
    return report


def probe_card_entry(model_path: Path, probe_wav: Path, *, file_name: str = PROBE_FILE) -> dict:
    """For the exporter: the card's probe entry for `model_path`'s transcript of `probe_wav`.

    Publish `probe_wav` as `file_name` beside model.onnx (so the card hashes it) and put the result
    under card["probe"]; warm-up then checks the deployed graph reproduces it.
    """
    model = OnnxModel(model_path, intra_op_threads=1)
    transcript, _ = streaming_transcript(model, read_probe(probe_wav))
    return {"file": file_name, "transcript": transcript}


__all__ = ["PROBE_CARD_KEY", "PROBE_FILE", "WarmupFailed", "WarmupReport", "probe_card_entry",
           "streaming_transcript", "synthetic_probe", "warm_up"]
