"""Helpers for the online-trainer tests: tiny versions with torch weights, toy corpora, feedback in a store."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE_HZ = 16_000
TONE_HZ = {"a": 300.0, "b": 1200.0, "c": 2500.0}


def tone(text: str, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """A toy "utterance": a tone whose pitch says which word it is, plus a little noise."""
    t = np.arange(int(seconds * SAMPLE_RATE_HZ)) / SAMPLE_RATE_HZ
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    return (0.3 * np.sin(2 * np.pi * TONE_HZ[text] * t) + noise).astype(np.float32)


def tiny_version(out_dir: Path, version: str, seed: int = 0) -> Path:
    """A complete version directory (model.onnx, policy/, card.json) of a tiny random policy."""
    import torch
    from voxloop.trainer.model import VoxloopCTCConfig, VoxloopForCTC
    from voxloop.trainer.release import build_release

    torch.manual_seed(seed)
    model = VoxloopForCTC(VoxloopCTCConfig(num_layers=2, d_model=64, num_heads=2, ff_multiplier=2, dropout=0.0))
    checkpoint = out_dir.parent / f".ckpt-{version}"
    model.save_pretrained(checkpoint)
    build_release(checkpoint, out_dir, version)
    return out_dir


def write_corpus(corpus_dir: Path, splits: dict[str, list[tuple[str, np.ndarray]]]) -> Path:
    """A corpus directory: <split>.jsonl manifests over 16 kHz int16 wavs."""
    for split, rows in splits.items():
        (corpus_dir / split).mkdir(parents=True, exist_ok=True)
        with (corpus_dir / f"{split}.jsonl").open("w") as f:
            for i, (text, samples) in enumerate(rows):
                path = f"{split}/{split}-{i:04d}.wav"
                sf.write(corpus_dir / path, samples, SAMPLE_RATE_HZ, subtype="PCM_16")
                f.write(json.dumps({"id": f"{split}-{i:04d}", "path": path, "text": text, "voice": "toy",
                                    "duration_s": len(samples) / SAMPLE_RATE_HZ}) + "\n")
    return corpus_dir


def add_feedback(store, samples: np.ndarray, *, kind: str = "correction", text: str | None = None,
                 hypothesis: str = "", user: str | None = None, alternatives=None, chosen_index=None,
                 model_version: str = "v") -> int:
    """Store an utterance with `samples` and one feedback item on it; returns the feedback id."""
    from voxloop.core.pcm import float_to_pcm16
    from voxloop.core.store import UtteranceRecord

    utterance_id = uuid.uuid4().hex
    store.add_utterance(UtteranceRecord(
        id=utterance_id, tenant="default", user_id=None, session_id=None, model_version=model_version,
        created_at=datetime.now(UTC), duration_s=len(samples) / SAMPLE_RATE_HZ, sample_rate_hz=SAMPLE_RATE_HZ,
        audio=float_to_pcm16(samples), hypothesis=hypothesis,
        alternatives=tuple(alternatives) if alternatives is not None else None,
    ))
    record = store.submit_feedback(utterance_id, tenant="default", user=user or uuid.uuid4().hex[:8], kind=kind,
                                   reward=0.0, corrected_text=text, chosen_index=chosen_index)
    return record.id
