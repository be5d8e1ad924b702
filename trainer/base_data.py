"""Base-corpus data for the trainer: the fixed anchor set the gate scores and the replay pool.

- anchor: `anchor_size` utterances of the corpus's **dev** split, drawn with a fixed seed, so the set
  is the same in every cycle and every process. Pretraining only picks its best checkpoint on dev
  and the online trainer never trains on dev, so anchor utterances are never trained on.
- replay: `replay_pool_size` utterances of the **train** split (fixed seed), held in memory as int16;
  minibatches draw from it (InstructGPT's pretraining mix against forgetting).

Where the corpus comes from: `corpus_dir` when it holds train.jsonl and dev.jsonl (the synthetic
corpus `voxloop pretrain corpus` builds, ~4.5 min); otherwise a small corpus synthesized once with
espeak-ng and flite (`fallback_sentences` sentences, seed 0, ~20 s on 2 cores) under
`<data_dir>/trainer/base-corpus`, so a fresh clone or a deployed server without the corpus still
gates against a fixed anchor set. The fallback is the first utterances of each split of the real
corpus's own plan (same sentences, voices, speeds), so its dev split, hence the anchor, holds
sentences the base model never trained on.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.pcm import int16_to_float
from .data import load_examples, read_manifest
from .tokenizer import encode_targets, make_tokenizer

log = logging.getLogger(__name__)

FALLBACK_CORPUS_DIR = "base-corpus"
FALLBACK_DEV_SHARE = 0.2
"""Share of the fallback corpus's sentences in its dev split (the anchor set draws from it)."""
ANCHOR_SEED = 0
REPLAY_SEED = 1


@dataclass(frozen=True)
class Utterance:
    id: str
    samples: np.ndarray
    """int16 16 kHz mono."""
    text: str
    target_ids: list[int]

    def float_samples(self) -> np.ndarray:
        return int16_to_float(self.samples)


def has_corpus(corpus_dir: Path | None) -> bool:
    return corpus_dir is not None and (corpus_dir / "train.jsonl").is_file() and (corpus_dir / "dev.jsonl").is_file()


def ensure_corpus(corpus_dir: Path | None, trainer_dir: Path, fallback_sentences: int = 600) -> Path:
    """`corpus_dir` if it is a corpus, else the fallback corpus under `trainer_dir` (built on first use)."""
    if has_corpus(corpus_dir):
        return corpus_dir
    fallback = trainer_dir / FALLBACK_CORPUS_DIR
    if has_corpus(fallback) and (fallback / "corpus.json").is_file():
        return fallback
    from .config import CorpusConfig
    from .corpus import build_corpus, plan_subset  # imports the synthesizers only when needed

    log.warning("no corpus at %s: synthesizing a small anchor/replay corpus (%d sentences) in %s",
                corpus_dir, fallback_sentences, fallback)
    partial = fallback.with_name(fallback.name + ".partial")
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    # Utterances of the base corpus's own plan (CorpusConfig defaults, as `voxloop pretrain corpus`
    # builds it): the anchor (dev) then reads sentences the base model never trained on.
    base = CorpusConfig(out_dir=partial, workers=2, seed=0)
    n_dev = max(1, round(FALLBACK_DEV_SHARE * fallback_sentences))
    build_corpus(base, plan_subset(base, {"train": fallback_sentences - n_dev, "dev": n_dev}))
    partial.rename(fallback)  # corpus.json is written last, the rename makes it visible whole
    return fallback


class BaseData:
    """The anchor set and the replay pool of one corpus (loaded lazily, then kept in memory)."""

    def __init__(self, corpus_dir: Path, vocabulary: list[str], anchor_size: int, replay_pool_size: int):
        self.corpus_dir = corpus_dir
        self._tokenizer = make_tokenizer(vocabulary)
        self.anchor_size = anchor_size
        self.replay_pool_size = replay_pool_size
        self._anchor: list[Utterance] | None = None
        self._replay: list[Utterance] | None = None

    def _load(self, split: str, size: int, seed: int) -> list[Utterance]:
        rows = sorted(read_manifest(self.corpus_dir / f"{split}.jsonl"), key=lambda r: r["id"])
        chosen = random.Random(seed).sample(rows, min(size, len(rows)))
        examples = load_examples(chosen, self.corpus_dir, lambda text: encode_targets(self._tokenizer, text))
        return [Utterance(e.id, e.samples, e.text, e.target_ids) for e in examples]

    @property
    def anchor(self) -> list[Utterance]:
        if self._anchor is None:
            self._anchor = self._load("dev", self.anchor_size, ANCHOR_SEED)
            log.info("anchor set: %d dev utterances of %s", len(self._anchor), self.corpus_dir)
        return self._anchor

    @property
    def replay_pool(self) -> list[Utterance]:
        if self._replay is None:
            self._replay = self._load("train", self.replay_pool_size, REPLAY_SEED) if self.replay_pool_size else []
            log.info("replay pool: %d train utterances of %s", len(self._replay), self.corpus_dir)
        return self._replay

    def replay(self, count: int, rng: random.Random) -> list[tuple[np.ndarray, list[int]]]:
        """`count` replay utterances (float32 samples, target ids), drawn with `rng` (a ReplaySampler)."""
        pool = self.replay_pool
        if not pool:
            return []
        return [(u.float_samples(), u.target_ids) for u in rng.sample(pool, min(count, len(pool)))]


__all__ = ["BaseData", "Utterance", "ensure_corpus", "has_corpus"]
