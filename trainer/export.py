"""ONNX export of the policy (docs/model-format.md) with a parity check that fails loudly.

The export goes through a thin wrapper with named inputs/outputs and `metadata_props` the server
reads. Parity is checked at several lengths, and chunk by chunk: a graph that baked the traced
length into a shape (the classic legacy-exporter failure) passes at one length and fails at others.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from .model import BLANK_TOKEN, UNK_TOKEN, WORD_DELIMITER_TOKEN, StreamingState, VoxloopForCTC

log = logging.getLogger(__name__)

MODEL_FORMAT = "streaming-ctc/1"
ONNX_OPSET = 17
INPUT_NAMES = ["audio", "att_cache", "conv_cache", "cache_len"]
OUTPUT_NAMES = ["log_probs", "next_att_cache", "next_conv_cache", "next_cache_len"]


@dataclass(frozen=True)
class ParityConfig:
    """What "the ONNX graph matches torch" means."""

    max_abs_logprob_diff: float = 1e-4
    """Largest |log p_torch - log p_onnx| allowed over every frame and token."""
    probe_seconds: tuple[float, ...] = (1.3, 4.7)
    """Whole-utterance lengths checked (at least two, so a baked-in length is caught)."""
    streaming_chunks: int = 6
    """Chunks decoded one by one through the caches, compared with the whole-utterance pass."""
    seed: int = 0


@dataclass(frozen=True)
class ParityReport:
    max_abs_logprob_diff: float
    greedy_transcripts_equal: bool
    lengths_s: tuple[float, ...]

    def as_dict(self) -> dict:
        return {
            "max_abs_logprob_diff": self.max_abs_logprob_diff,
            "greedy_transcripts_equal": self.greedy_transcripts_equal,
            "lengths_s": list(self.lengths_s),
        }


class ParityError(RuntimeError):
    """The exported graph does not compute what the torch policy computes."""


class StreamingExportWrapper(nn.Module):
    """Flat tensors in and out, log-softmax inside: the graph contract of docs/model-format.md."""

    def __init__(self, model: VoxloopForCTC):
        super().__init__()
        self.model = model

    def forward(self, audio, att_cache, conv_cache, cache_len):
        logits, state = self.model.encode(audio, StreamingState(att_cache, conv_cache, cache_len))
        return torch.log_softmax(logits, dim=-1), state.att_cache, state.conv_cache, state.cache_len


def serving_vocabulary(vocabulary: list[str]) -> list[str]:
    """The vocabulary as the server prints it: the word delimiter is a space, <unk> and any other
    <special> token print nothing; the blank (index 0, never printed) keeps its name."""
    def printed(token: str) -> str:
        if token == WORD_DELIMITER_TOKEN:
            return " "
        return "" if token == UNK_TOKEN or (len(token) > 2 and token[0] == "<" and token[-1] == ">") else token

    return [vocabulary[0], *(printed(t) for t in vocabulary[1:])]


def model_metadata(model: VoxloopForCTC, version: str) -> dict[str, str]:
    c = model.config
    return {
        "voxloop.format": MODEL_FORMAT,
        "voxloop.version": version,
        "voxloop.vocabulary": json.dumps(serving_vocabulary(c.vocabulary)),
        "voxloop.sample_rate_hz": str(c.sample_rate_hz),
        "voxloop.hop_samples": str(c.hop_samples),
        "voxloop.window_samples": str(c.window_samples),
        "voxloop.subsampling": str(c.subsampling),
        "voxloop.chunk_frames": str(c.chunk_frames),
        "voxloop.chunk_samples": str(c.chunk_samples),
        "voxloop.lookback_samples": str(c.lookback_samples),
        "voxloop.num_layers": str(c.num_layers),
        "voxloop.d_model": str(c.d_model),
        "voxloop.cache_frames": str(c.cache_frames),
        "voxloop.conv_cache_frames": str(c.conv_cache_frames),
    }


def export_onnx(model: VoxloopForCTC, path: Path, version: str) -> Path:
    """Write `model` as a single self-contained ONNX file (no .onnx.data side file)."""
    model = model.eval()
    wrapper = StreamingExportWrapper(model).eval()
    c = model.config
    # Trace with two chunks so T differs from chunk_frames; dynamic axes keep every length open.
    example_audio = torch.zeros(1, 2 * c.chunk_samples + c.lookback_samples)
    state = model.initial_state(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (example_audio, state.att_cache, state.conv_cache, state.cache_len),
            str(path),
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes={
                "audio": {0: "batch", 1: "samples"},
                "att_cache": {0: "batch"},
                "conv_cache": {0: "batch"},
                "cache_len": {0: "batch"},
                "log_probs": {0: "batch", 1: "frames"},
                "next_att_cache": {0: "batch"},
                "next_conv_cache": {0: "batch"},
                "next_cache_len": {0: "batch"},
            },
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    for key, value in model_metadata(model, version).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    log.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def greedy_ctc_text(log_probs: np.ndarray, vocabulary: list[str]) -> str:
    """Best-path CTC decode of (T, V) scores: argmax, collapse repeats, drop blanks."""
    best = log_probs.argmax(-1)
    tokens = [int(t) for i, t in enumerate(best) if t != 0 and (i == 0 or t != best[i - 1])]
    return " ".join("".join(serving_vocabulary(vocabulary)[t] for t in tokens).split())


def _onnx_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_onnx(session: ort.InferenceSession, audio: np.ndarray, state: StreamingState):
    feeds = {
        "audio": audio.astype(np.float32),
        "att_cache": state.att_cache.numpy(),
        "conv_cache": state.conv_cache.numpy(),
        "cache_len": state.cache_len.numpy(),
    }
    log_probs, att, conv, cache_len = session.run(OUTPUT_NAMES, feeds)
    return log_probs, StreamingState(torch.from_numpy(att), torch.from_numpy(conv), torch.from_numpy(cache_len))


def check_parity(model: VoxloopForCTC, onnx_path: Path, config: ParityConfig = ParityConfig()) -> ParityReport:
    """Compare torch and onnxruntime on random audio at several lengths and chunk by chunk.

    Raises ParityError when any log-prob differs by more than the tolerance or a greedy transcript
    differs; returns the figures for the model card otherwise.
    """
    if len(config.probe_seconds) < 2:
        raise ValueError("ParityConfig.probe_seconds needs at least two lengths to catch a baked-in length")
    model = model.eval()
    c = model.config
    session = _onnx_session(onnx_path)
    generator = torch.Generator().manual_seed(config.seed)
    worst, transcripts_equal = 0.0, True

    def compare(expected: torch.Tensor, actual: np.ndarray, what: str) -> None:
        nonlocal worst, transcripts_equal
        if expected.shape != actual.shape:
            raise ParityError(f"{what}: torch gives shape {tuple(expected.shape)}, ONNX {actual.shape}")
        worst = max(worst, float(np.abs(expected.numpy() - actual).max()))
        for row_torch, row_onnx in zip(expected.numpy(), actual, strict=True):
            if greedy_ctc_text(row_torch, c.vocabulary) != greedy_ctc_text(row_onnx, c.vocabulary):
                transcripts_equal = False

    with torch.no_grad():
        for seconds in config.probe_seconds:
            audio = 0.1 * torch.randn(2, int(seconds * c.sample_rate_hz), generator=generator)
            logits, _ = model.encode(audio, model.initial_state(2))
            onnx_log_probs, _ = _run_onnx(session, audio.numpy(), model.initial_state(2))
            compare(torch.log_softmax(logits, -1), onnx_log_probs, f"{seconds:.2f} s utterance")
        # Chunk by chunk through the caches (what the server does), against the torch whole pass.
        window = c.chunk_samples + c.lookback_samples
        audio = 0.1 * torch.randn(1, config.streaming_chunks * c.chunk_samples + c.lookback_samples,
                                  generator=generator)
        logits, _ = model.encode(audio, model.initial_state(1))
        state, pieces = model.initial_state(1), []
        for start in range(0, config.streaming_chunks * c.chunk_samples, c.chunk_samples):
            piece, state = _run_onnx(session, audio[:, start : start + window].numpy(), state)
            pieces.append(piece)
        compare(torch.log_softmax(logits, -1), np.concatenate(pieces, axis=1), "chunked stream")

    report = ParityReport(worst, transcripts_equal, tuple(config.probe_seconds))
    if worst > config.max_abs_logprob_diff or not transcripts_equal:
        raise ParityError(
            f"ONNX export does not match torch: max |dlogp| = {worst:.3g} "
            f"(tolerance {config.max_abs_logprob_diff:g}), greedy transcripts equal: {transcripts_equal}"
        )
    log.info("parity ok: max |dlogp| = %.2e over %s", worst, config.probe_seconds)
    return report


__all__ = [
    "BLANK_TOKEN",
    "MODEL_FORMAT",
    "ParityConfig",
    "ParityError",
    "ParityReport",
    "check_parity",
    "export_onnx",
    "greedy_ctc_text",
    "model_metadata",
]
