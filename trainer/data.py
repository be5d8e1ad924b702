"""Training data: manifests of 16 kHz utterances, held in memory, batched by total audio duration."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.model import MODEL_SAMPLE_RATE_HZ
from ..core.pcm import int16_to_float, read_wav

IGNORE_INDEX = -100  # label padding (HF convention), ignored by the CTC loss


@dataclass
class Example:
    id: str
    samples: np.ndarray  # int16, 16 kHz mono
    target_ids: list[int]
    text: str
    voice: str


def read_manifest(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def load_examples(rows: list[dict], corpus_dir: Path, encode) -> list[Example]:
    """Read every row's audio (int16 in memory: 10 h of audio is ~1.2 GB) and encode its text."""
    examples = []
    for row in rows:
        samples = read_wav(corpus_dir / row["path"], MODEL_SAMPLE_RATE_HZ, dtype="int16")  # (S,)
        examples.append(Example(row["id"], samples, encode(row["text"]), row["text"], row.get("voice", "")))
    return examples


def duration_batches(
    examples: list[Example], max_batch_seconds: float, rng: random.Random, sample_rate_hz: int = 16000
) -> Iterator[list[Example]]:
    """Batches of similar-length utterances whose padded duration stays under max_batch_seconds.

    Sorting by length inside shuffled buckets keeps padding small; the batch order is shuffled so
    an epoch does not go from short to long.
    """
    order = sorted(examples, key=lambda e: len(e.samples) + rng.random() * sample_rate_hz)
    batches, batch, longest = [], [], 0
    for example in order:
        longest_if_added = max(longest, len(example.samples))
        if batch and longest_if_added * (len(batch) + 1) > max_batch_seconds * sample_rate_hz:
            batches.append(batch)
            batch, longest_if_added = [], len(example.samples)
        batch.append(example)
        longest = longest_if_added
    if batch:
        batches.append(batch)
    rng.shuffle(batches)
    yield from batches


def collate(batch: list[Example], waveforms: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Pad to (B, S) float audio in [-1, 1] and (B, U) labels padded with IGNORE_INDEX."""
    if waveforms is None:
        waveforms = [torch.from_numpy(int16_to_float(e.samples)) for e in batch]
    lengths = torch.tensor([len(w) for w in waveforms])
    audio = torch.zeros(len(batch), int(lengths.max()))
    for i, w in enumerate(waveforms):
        audio[i, : len(w)] = w
    max_target = max(len(e.target_ids) for e in batch)
    labels = torch.full((len(batch), max_target), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(batch):
        labels[i, : len(e.target_ids)] = torch.tensor(e.target_ids)
    return {"input_values": audio, "input_lengths": lengths, "labels": labels}
