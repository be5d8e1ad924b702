"""Train the first pass's CTC head on Whisper's frozen encoder, from the synthetic corpus.

The head sees exactly what it sees when serving: the encoder states of each streaming window
(history + chunk, whisper_model.WhisperPolicy.streaming_ctc_log_probs), computed once per utterance
with the encoder frozen, so training is a few minutes of a small MLP over cached features. The
utterances get random silence around them and, for some, background noise, so the head learns to
answer blank where nobody speaks: the endpointer reads its blanks.

    python -m voxloop.trainer.whisper_head --corpus corpus --out models/whisper-tiny.en
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from ..core.decoder import greedy_ctc_text, serving_vocabulary
from ..core.pcm import read_wav
from ..core.text import normalize_text
from .config import DEFAULT_CORPUS_DIR
from .evaluate import error_rates
from .tokenizer import encode_targets, make_tokenizer
from .whisper_model import SAMPLE_RATE_HZ, SAMPLES_PER_ENCODER_FRAME, WhisperPolicy, run_encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CtcHeadTrainingConfig:
    """How the first pass's CTC head is trained (the encoder stays frozen)."""

    train_utterances: int = 3000
    """Corpus training utterances whose streamed encoder states are computed (the costly part)."""
    dev_utterances: int = 200
    """Corpus dev utterances the head's greedy CER is measured on after each epoch."""
    epochs: int = 25
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-2
    max_edge_silence_s: float = 1.0
    """Up to this much silence is added before and after each utterance (uniformly at random)."""
    noise_fraction: float = 0.5
    """Share of utterances mixed with white noise."""
    noise_snr_db: tuple[float, float] = (10.0, 40.0)
    """Signal-to-noise ratio range of that noise."""
    encoder_batch_windows: int = 32
    """Windows per encoder call while caching states."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train_utterances < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("train_utterances, epochs and batch_size must be >= 1")


def augment_utterance(audio: np.ndarray, rng: random.Random, config) -> np.ndarray:
    """Random edge silence and, for some, white noise (config: max_edge_silence_s, noise_fraction, noise_snr_db)."""
    before = np.zeros(int(rng.uniform(0, config.max_edge_silence_s) * SAMPLE_RATE_HZ), np.float32)
    after = np.zeros(int(rng.uniform(0, config.max_edge_silence_s) * SAMPLE_RATE_HZ), np.float32)
    audio = np.concatenate([before, audio, after])
    if rng.random() < config.noise_fraction:
        power = float(np.mean(audio**2)) + 1e-10
        snr_db = rng.uniform(*config.noise_snr_db)
        noise = np.random.default_rng(rng.randrange(1 << 30)).standard_normal(len(audio)).astype(np.float32)
        audio = audio + noise * math.sqrt(power / 10 ** (snr_db / 10))
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


@torch.no_grad()
def streamed_states(policy: WhisperPolicy, audio: np.ndarray, batch_windows: int) -> torch.Tensor:
    """(S,) -> (T, L + 1, D) every layer's encoder states of each chunk's frames, as the streaming graph
    computes them (float16: thousands of utterances are kept in memory)."""
    s = policy.settings
    windows, frames = policy.first_pass_windows(torch.from_numpy(audio))  # (N, H + C)
    first = s.history_samples // SAMPLES_PER_ENCODER_FRAME
    states = [run_encoder(policy.model, policy.log_mel(w), all_layers=True)[:, :, first : first + s.chunk_frames]
              for w in windows.split(batch_windows)]  # each (N, L + 1, chunk_frames, D)
    states = torch.cat(states).transpose(0, 1)  # (L + 1, N, chunk_frames, D)
    return states.reshape(states.shape[0], -1, states.shape[-1])[:, :frames].transpose(0, 1).half()  # (T, L + 1, D)


def _cache(policy: WhisperPolicy, rows: list[dict], corpus_dir: Path, tokenizer, config: CtcHeadTrainingConfig,
           rng: random.Random, what: str) -> list[tuple[torch.Tensor, list[int], str]]:
    cached = []
    for row in tqdm(rows, desc=f"encoding {what}", unit="utt"):
        text = normalize_text(row["text"])
        try:
            targets = encode_targets(tokenizer, text)
        except ValueError:
            continue
        audio = read_wav(corpus_dir / row["path"], SAMPLE_RATE_HZ)
        cached.append((streamed_states(policy, augment_utterance(audio, rng, config), config.encoder_batch_windows),
                       targets, text))
    return cached


def train_ctc_head(policy: WhisperPolicy, corpus_dir: Path, config: CtcHeadTrainingConfig) -> dict:
    """Fit policy.ctc_head (in place) on the corpus's train split; returns the training report."""
    corpus_dir = Path(corpus_dir)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    vocabulary = list(policy.settings.ctc_vocabulary)
    tokenizer = make_tokenizer(vocabulary)
    read = lambda split: [json.loads(line) for line in (corpus_dir / f"{split}.jsonl").read_text().splitlines()]  # noqa: E731
    train_rows = read("train")
    rng.shuffle(train_rows)
    began = time.perf_counter()
    policy.eval()
    train = _cache(policy, train_rows[: config.train_utterances], corpus_dir, tokenizer, config, rng, "train")
    dev = _cache(policy, read("dev")[: config.dev_utterances], corpus_dir, tokenizer, config, rng, "dev")
    cached_s = time.perf_counter() - began
    head = policy.ctc_head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(train) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=steps)
    printed = serving_vocabulary(vocabulary)
    curve = []
    for epoch in range(config.epochs):
        rng.shuffle(train)
        losses = []
        for start in range(0, len(train), config.batch_size):
            batch = train[start : start + config.batch_size]
            states = torch.nn.utils.rnn.pad_sequence([b[0] for b in batch], batch_first=True).float()  # (B, T, L+1, D)
            targets = torch.cat([torch.tensor(b[1]) for b in batch])
            log_probs = head(states.transpose(1, 2)).transpose(0, 1)  # (T, B, V)
            loss = F.ctc_loss(log_probs, targets, torch.tensor([len(b[0]) for b in batch]),
                              torch.tensor([len(b[1]) for b in batch]), blank=0, zero_infinity=True)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        head.eval()
        with torch.no_grad():
            hypotheses = [greedy_ctc_text(head(d[0].float().transpose(0, 1)[None])[0].numpy(), printed) for d in dev]
        head.train()
        summary = error_rates([d[2] for d in dev], hypotheses)
        curve.append({"epoch": epoch + 1, "train_ctc_loss": float(np.mean(losses)), "dev_cer": summary.cer,
                      "dev_wer": summary.wer})
        log.info("epoch %d: loss %.3f, dev CER %.1f%%, WER %.1f%%", epoch + 1, np.mean(losses), summary.cer * 100,
                 summary.wer * 100)
    head.eval()
    return {"config": asdict(config), "train_utterances": len(train), "dev_utterances": len(dev),
            "encoding_s": round(cached_s, 1), "training_s": round(time.perf_counter() - began - cached_s, 1),
            "curve": curve, "dev_cer": curve[-1]["dev_cer"], "dev_wer": curve[-1]["dev_wer"]}


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file

    from .whisper_ct2 import convert_ct2_whisper
    from .whisper_import import HEAD_FILE, HEAD_REPORT_FILE, pinned_ct2_files

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS_DIR)
    parser.add_argument("--out", type=Path, required=True, help="directory for the head's weights and report")
    parser.add_argument("--train-utterances", type=int, default=CtcHeadTrainingConfig.train_utterances)
    parser.add_argument("--epochs", type=int, default=CtcHeadTrainingConfig.epochs)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = CtcHeadTrainingConfig(train_utterances=args.train_utterances, epochs=args.epochs)
    policy = WhisperPolicy.with_new_head(convert_ct2_whisper(pinned_ct2_files()), seed=config.seed)
    report = train_ctc_head(policy, args.corpus, config)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in policy.ctc_head.state_dict().items()}, str(args.out / HEAD_FILE))
    (args.out / HEAD_REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    print(f"CTC head: dev CER {report['dev_cer']:.1%}, WER {report['dev_wer']:.1%} -> {args.out / HEAD_FILE}")


if __name__ == "__main__":
    main()
