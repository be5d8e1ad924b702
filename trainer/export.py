"""ONNX export of the policy (docs/model-format.md) with a parity check that fails loudly.

The export goes through a thin wrapper with named inputs/outputs and `metadata_props` the server
reads (core/model.py's contract). Parity is checked at several lengths, and chunk by chunk through
the windows a server stream feeds (`ModelSpec.windows`), run as the server runs them (`OnnxModel`): a
graph that baked the traced length into a shape (the classic legacy-exporter failure) passes at one
length and fails at others.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..core.decoder import greedy_ctc_text, serving_vocabulary
from ..core.model import STREAMING_CTC_FORMAT, OnnxModel, metadata_props
from .model import StreamingState, VoxloopForCTC

log = logging.getLogger(__name__)

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
    """Seed of the random audio the two are compared on."""


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


def model_metadata(model: VoxloopForCTC, version: str) -> dict[str, str]:
    c = model.config
    return metadata_props({
        "format": STREAMING_CTC_FORMAT, "version": version, "vocabulary": serving_vocabulary(c.vocabulary),
        "sample_rate_hz": c.sample_rate_hz, "hop_samples": c.hop_samples, "window_samples": c.window_samples,
        "subsampling": c.subsampling, "chunk_frames": c.chunk_frames, "chunk_samples": c.chunk_samples,
        "lookback_samples": c.lookback_samples, "num_layers": c.num_layers, "d_model": c.d_model,
        "cache_frames": c.cache_frames, "conv_cache_frames": c.conv_cache_frames,
    })


def write_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Add `metadata` (metadata_props) to the ONNX file at `path`, in place."""
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


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
    write_onnx_metadata(path, model_metadata(model, version))
    log.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def check_parity(model: VoxloopForCTC, onnx_path: Path, config: ParityConfig = ParityConfig()) -> ParityReport:
    """Compare torch and onnxruntime on random audio at several lengths and chunk by chunk.

    Raises ParityError when any log-prob differs by more than the tolerance or a greedy transcript
    differs; returns the figures for the model card otherwise.
    """
    if len(config.probe_seconds) < 2:
        raise ValueError("ParityConfig.probe_seconds needs at least two lengths to catch a baked-in length")
    model = model.eval()
    c = model.config
    graph = OnnxModel(onnx_path, intra_op_threads=1)
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
            onnx_log_probs, _ = graph.run(audio.numpy(), graph.initial_state(2))
            compare(torch.log_softmax(logits, -1), onnx_log_probs, f"{seconds:.2f} s utterance")
        # Chunk by chunk through the caches, in the windows a server stream feeds, against the torch whole pass.
        audio = 0.1 * torch.randn(1, config.streaming_chunks * c.chunk_samples + c.lookback_samples,
                                  generator=generator)
        logits, _ = model.encode(audio, model.initial_state(1))
        state, pieces = graph.initial_state(1), []
        for start, end in itertools.islice(graph.spec.windows(audio.shape[1]), config.streaming_chunks):
            piece, state = graph.run(audio[:, start:end].numpy(), state)
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
    "ParityConfig",
    "ParityError",
    "ParityReport",
    "check_parity",
    "export_onnx",
    "model_metadata",
    "write_onnx_metadata",
]
