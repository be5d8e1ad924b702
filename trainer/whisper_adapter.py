"""Teach Whisper's decoder the synthetic corpus's voices: a low-rank adapter, trained here, merged at import.

Whisper tiny.en hears people (5.7% WER on real recordings) but reads the encoder states of espeak-ng's
formant voices poorly (35% WER on the corpus's training voices, 54% on its held-out espeak-ng voice),
and those are the voices the bench scenarios and many users' TTS test clips speak with. A LoRA
adapter (peft) on the decoder's layers -- self-attention, the cross-attention's queries and output,
the feed-forward --, trained with cross-entropy on the corpus's train split, teaches the decoder
those voices while the weights it adds stay a few hundred thousand numbers (committed beside the
import recipe, ~1 MB) and the original weights stay untouched (a low rank and a small learning rate:
what Whisper learned from people is kept; real-speech WER is checked before an adapter is committed).
The shipped one (rank 8, 6,000 utterances): held-out espeak-ng voice 53% -> 45% WER, real recordings
unchanged (docs/benchmarks.md, "The decoder adapter"; a larger learning rate cost real speech).

What does not train, and why: the encoder (the first pass's CTC head was fit to its states and
would have to be retrained), and the cross-attention's keys and values (frozen by the online
trainer too, so each utterance's keys and values are computed once, without gradients). The
utterances get random silence around them and some background noise, as endpointed speech has.

    python -m voxloop.trainer.whisper_adapter --corpus corpus --out models/whisper-tiny.en
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
from tqdm import tqdm

from ..core.pcm import read_wav
from ..core.text import normalize_text
from .config import DEFAULT_CORPUS_DIR
from .evaluate import error_rates, load_samples
from .ppo import masked_mean
from .whisper_head import augment_utterance
from .whisper_model import SAMPLE_RATE_HZ, WhisperPolicy, cross_key_values
from .whisper_update import Tokenizer, candidate_log_probs, generate

log = logging.getLogger(__name__)

ADAPTER_DIR = "decoder_adapter"
"""The adapter's peft files (adapter_config.json, adapter_model.safetensors) in the recipe directory."""
ADAPTER_REPORT_FILE = "decoder_adapter_report.json"
TARGET_MODULES = (r"model\.decoder\.layers\.\d+\."
                  r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|encoder_attn\.(q_proj|out_proj)|fc1|fc2)")
"""The decoder's linear layers the adapter wraps (a regex over module names: peft's full-match form)."""


@dataclass(frozen=True)
class AdapterTrainingConfig:
    """How the decoder adapter is trained on the synthetic corpus."""

    train_utterances: int = 6000
    dev_utterances: int = 100
    """Utterances of each evaluation manifest decoded (greedy, torch) before and after training."""
    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 2e-4
    warmup_fraction: float = 0.05
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    max_edge_silence_s: float = 0.5
    """Up to this much silence is added before and after each utterance (uniformly at random)."""
    noise_fraction: float = 0.3
    noise_snr_db: tuple[float, float] = (15.0, 40.0)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train_utterances < 1 or self.epochs < 1 or self.batch_size < 1 or self.rank < 1:
            raise ValueError("train_utterances, epochs, batch_size and rank must be >= 1")


def lora_config(config: AdapterTrainingConfig):
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=TARGET_MODULES, bias="none")


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@torch.no_grad()
def encode_batch(policy: WhisperPolicy, audios: list[np.ndarray], silence: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Utterances -> their cross-attention keys and values (L, B, heads, 1500, hd), as the second pass sees them."""
    lengths = torch.tensor([len(a) for a in audios])
    batch = torch.zeros(len(audios), int(lengths.max()))
    for i, a in enumerate(audios):
        batch[i, : len(a)] = torch.from_numpy(a)
    return cross_key_values(policy.model, policy.final_encoder_states(batch, lengths, silence))


def target_tokens(tokenizer: Tokenizer, row: dict) -> list[int]:
    """The written sentence (case and punctuation, as Whisper writes) when the corpus keeps it."""
    return tokenizer.encode(" " + (row.get("raw_text") or row["text"]).strip())


@torch.no_grad()
def greedy_wer(policy: WhisperPolicy, tokenizer: Tokenizer, rows: list[dict], root: Path, what: str,
               batch_size: int = 8) -> float:
    """Greedy torch decoding of `rows` (a manifest's, audio relative to `root`) -> WER."""
    silence = policy.silence_states()
    hypotheses = []
    for start in tqdm(range(0, len(rows), batch_size), desc=f"decoding {what}", unit="batch", leave=False):
        batch = rows[start : start + batch_size]
        audios = [load_samples(root / r["path"]) for r in batch]
        cross_k, cross_v = encode_batch(policy, audios, silence)
        budgets = [int(8 + 12 * len(a) / SAMPLE_RATE_HZ) for a in audios]
        tokens = generate(policy, cross_k, cross_v, [True] * len(batch), budgets, None, 1.0)
        hypotheses += [tokenizer.normalized(t) for t in tokens]
    return error_rates([normalize_text(r["text"]) for r in rows], hypotheses).wer


@torch.no_grad()
def mean_cross_entropy(policy: WhisperPolicy, tokenizer: Tokenizer, rows: list[dict], root: Path,
                       batch_size: int = 16) -> float:
    """Nats per token of the rows' written sentences given their audio (teacher forcing, no augmentation)."""
    silence = policy.silence_states()
    total, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        cross_k, cross_v = encode_batch(policy, [load_samples(root / r["path"]) for r in batch], silence)
        _, chosen, mask = candidate_log_probs(policy, cross_k, cross_v, [target_tokens(tokenizer, r) for r in batch])
        total -= float(chosen[mask].sum())
        tokens += int(mask.sum())
    return total / tokens


def train_adapter(policy: WhisperPolicy, tokenizer: Tokenizer, corpus_dir: Path, config: AdapterTrainingConfig,
                  evaluations: dict[str, tuple[list[dict], Path]]) -> tuple[object, dict]:
    """Wrap policy.model's decoder with a new adapter and fit it -> (the peft model, the training report)."""
    from peft import get_peft_model

    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    rows = read_manifest(corpus_dir / "train.jsonl")
    rng.shuffle(rows)
    rows = rows[: config.train_utterances]
    policy.eval().requires_grad_(False)
    before = {name: greedy_wer(policy, tokenizer, r, root, name) for name, (r, root) in evaluations.items()}
    log.info("before: %s", {k: f"{v:.1%}" for k, v in before.items()})
    # peft wraps the linear layers in place: policy.model now runs them with the adapter, the policy's code unchanged
    peft_model = get_peft_model(policy.model, lora_config(config))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    steps = config.epochs * math.ceil(len(rows) / config.batch_size)
    warmup = max(1, int(steps * config.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / max(1, steps - warmup)))
    silence = policy.silence_states()
    began = time.perf_counter()
    curve = []
    with tqdm(total=steps, desc="training the decoder adapter", unit="step") as progress:
        for epoch in range(config.epochs):
            rng.shuffle(rows)
            for start in range(0, len(rows), config.batch_size):
                batch = rows[start : start + config.batch_size]
                audios = [augment_utterance(read_wav(corpus_dir / r["path"], SAMPLE_RATE_HZ), rng, config)
                          for r in batch]
                cross_k, cross_v = encode_batch(policy, audios, silence)
                peft_model.train()
                _, chosen, mask = candidate_log_probs(policy, cross_k, cross_v,
                                                      [target_tokens(tokenizer, r) for r in batch])
                loss = -masked_mean(chosen, mask)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                schedule.step()
                curve.append(round(loss.item(), 4))
                progress.update()
                progress.set_postfix(loss=f"{np.mean(curve[-20:]):.3f}", epoch=epoch + 1)
    peft_model.eval()
    training_s = time.perf_counter() - began
    after = {name: greedy_wer(policy, tokenizer, r, root, name) for name, (r, root) in evaluations.items()}
    log.info("after: %s", {k: f"{v:.1%}" for k, v in after.items()})
    report = {"config": asdict(config), "target_modules": TARGET_MODULES,
              "trainable_parameters": sum(p.numel() for p in trainable), "train_utterances": len(rows),
              "steps": steps, "training_s": round(training_s, 1),
              "loss_per_50_steps": [round(float(np.mean(curve[i : i + 50])), 4) for i in range(0, len(curve), 50)],
              "greedy_wer_before": before, "greedy_wer_after": after}
    return peft_model, report


def merge_adapter(model, adapter_dir: Path):
    """policy weights + the committed adapter -> a plain WhisperForConditionalGeneration with it merged in."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def main(argv: list[str] | None = None) -> None:
    from .whisper_ct2 import convert_ct2_whisper
    from .whisper_import import ImportRecipe, load_head, pinned_ct2_files

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS_DIR)
    parser.add_argument("--out", type=Path, required=True, help="directory for the adapter and its report")
    parser.add_argument("--train-utterances", type=int, default=AdapterTrainingConfig.train_utterances)
    parser.add_argument("--epochs", type=int, default=AdapterTrainingConfig.epochs)
    parser.add_argument("--learning-rate", type=float, default=AdapterTrainingConfig.learning_rate)
    parser.add_argument("--rank", type=int, default=AdapterTrainingConfig.rank)
    parser.add_argument("--dev-utterances", type=int, default=AdapterTrainingConfig.dev_utterances)
    parser.add_argument("--real-speech", type=Path, default=None,
                        help="bench/real_speech.py --fetch's directory: its WER is reported (never trained on)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    config = AdapterTrainingConfig(train_utterances=args.train_utterances, epochs=args.epochs,
                                   learning_rate=args.learning_rate, rank=args.rank, alpha=2 * args.rank,
                                   dev_utterances=args.dev_utterances)
    recipe = ImportRecipe.named("whisper-tiny.en")
    files = pinned_ct2_files(recipe)
    model = convert_ct2_whisper(files)
    policy = WhisperPolicy(model, load_head(recipe, model), recipe.settings).eval()
    tokenizer = Tokenizer(files.tokenizer_json)
    evaluations = {split: (read_manifest(args.corpus / f"{split}.jsonl")[: config.dev_utterances], args.corpus)
                   for split in ("dev", "test_heldout_espeak", "test_heldout_flite")}
    if args.real_speech:
        evaluations["real_speech"] = (read_manifest(args.real_speech / "manifest.jsonl"), args.real_speech)
    peft_model, report = train_adapter(policy, tokenizer, args.corpus, config, evaluations)
    args.out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(args.out / ADAPTER_DIR))
    (args.out / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # peft's model-card template: nothing of ours
    (args.out / ADAPTER_REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"before": report["greedy_wer_before"], "after": report["greedy_wer_after"]}, indent=1))


if __name__ == "__main__":
    main()
