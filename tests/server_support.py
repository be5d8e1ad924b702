"""Helpers of the server tests: synthetic audio, and a tiny model that hears voiced sound.

The conftest's tiny random-weight model emits gibberish on any input, so it cannot exercise the
endpointer. `build_voice_activity_version` takes the same tiny policy (project code, exported with
the project's exporter) and fits only its CTC head, in closed form, so that frames of a voiced tone
come out as "a" and frames of silence as the blank: speech and pauses the server can see.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from voxloop.core.pcm import float_to_pcm16

RATE_HZ = 16000
VOICE_VERSION = "voice-0001"
VOICED_F0_HZ = 140.0
FRAME_SHIFT_S = 0.04  # the tiny policy's encoder frame shift (hop 160 x subsampling 4 at 16 kHz)


def voiced(seconds: float, rate_hz: int = RATE_HZ) -> np.ndarray:
    """A harmonic tone (vowel-like), float32 (S,)."""
    t = np.arange(int(round(seconds * rate_hz))) / rate_hz
    return (0.2 * sum(np.sin(2 * np.pi * VOICED_F0_HZ * k * t) / k for k in range(1, 12))).astype(np.float32)


def silence(seconds: float, rate_hz: int = RATE_HZ) -> np.ndarray:
    return np.zeros(int(round(seconds * rate_hz)), dtype=np.float32)


def noise(seconds: float, seed: int = 0, rate_hz: int = RATE_HZ) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(round(seconds * rate_hz)))).astype(np.float32)


def pcm16(samples: np.ndarray) -> bytes:
    """float32 (S,) or (S, C) -> LINEAR16 bytes (interleaved when 2-D)."""
    return float_to_pcm16(samples)


def chunked(data: bytes, chunk_bytes: int) -> list[bytes]:
    return [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]


def build_voice_activity_version(out_dir: Path, version: str = VOICE_VERSION) -> Path:
    """Publish a tiny policy whose head says "a" on voiced frames and blank on silence; returns the registry."""
    import torch
    from voxloop.core.registry import Registry
    from voxloop.trainer.export import export_onnx
    from voxloop.trainer.model import VoxloopCTCConfig, VoxloopForCTC

    torch.manual_seed(0)
    model = VoxloopForCTC(VoxloopCTCConfig(num_layers=2, d_model=64, num_heads=2, ff_multiplier=2)).eval()
    segments = [(silence(1.0), 0), (voiced(1.0), 1), (silence(2.0), 0), (voiced(0.6), 1), (silence(1.5), 0)]
    audio = np.concatenate([s for s, _ in segments])
    labels = np.concatenate([np.full(int(round(len(s) / RATE_HZ / FRAME_SHIFT_S)), v) for s, v in segments])
    hidden = []
    hook = model.ctc_head.register_forward_hook(lambda module, args, out: hidden.append(args[0]))
    with torch.no_grad():
        model.encode(torch.from_numpy(audio)[None], model.initial_state(1))
    hook.remove()
    features = hidden[0][0].numpy()  # (T, D): what the head sees
    frames = min(len(features), len(labels))
    features, labels = features[:frames], labels[:frames]
    direction = features[labels == 1].mean(0) - features[labels == 0].mean(0)  # (D,)
    threshold = 0.5 * (features[labels == 1] @ direction).mean() + 0.5 * (features[labels == 0] @ direction).mean()
    vocabulary = model.config.vocabulary
    with torch.no_grad():
        model.ctc_head.weight.zero_()
        model.ctc_head.bias.fill_(-30.0)  # every other token: never
        model.ctc_head.bias[0] = 0.0  # blank
        model.ctc_head.weight[vocabulary.index("a")] = torch.from_numpy(direction)
        model.ctc_head.bias[vocabulary.index("a")] = -float(threshold)
    onnx_path = export_onnx(model, out_dir / f".export-{version}" / "model.onnx", version)
    Registry(out_dir).publish(version, {"model.onnx": onnx_path},
                              {"parent_version": None, "description": "tiny voice-activity test model"})
    shutil.rmtree(onnx_path.parent)
    return out_dir

