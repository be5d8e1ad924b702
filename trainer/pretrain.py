"""Base-model pretraining: CTC on the synthetic corpus with SpecAugment and waveform augmentation.

`voxloop pretrain train` runs `pretrain(PretrainConfig(...))`: AdamW with linear warmup and cosine
decay over a step budget, checkpoints (model + optimizer + schedule + RNG) every few minutes and at
each epoch end, resume from the last checkpoint, dev WER/CER after every epoch, and the best
dev-WER weights kept apart for export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..core.pcm import int16_to_float
from .config import PretrainConfig
from .corpus import add_noise, add_reverb, speed_perturb
from .data import collate, duration_batches, load_examples, read_manifest
from .evaluate import error_rates, torch_transcriber
from .model import VoxloopCTCConfig, VoxloopForCTC
from .tokenizer import encode_targets, make_tokenizer

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "best"
TRAINER_STATE = "trainer_state.pt"
HISTORY_FILE = "history.jsonl"


def feature_stats(model: VoxloopForCTC, waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per mel bin over `waveforms`, for the frontend's global normalization."""
    with torch.no_grad():
        frames = torch.cat([model.frontend.log_mel(w[None])[0] for w in waveforms])
    return frames.mean(0), frames.std(0)


def augment(samples: np.ndarray, config: PretrainConfig, rng: random.Random, gen: torch.Generator) -> torch.Tensor:
    """int16 samples -> float waveform with random speed, reverberation and noise."""
    wave = torch.from_numpy(int16_to_float(samples))
    if rng.random() < config.speed_perturb_prob:
        wave = speed_perturb(wave, rng.choice((0.9, 1.1)))
    if rng.random() < config.reverb_prob:
        wave = add_reverb(wave, rng.uniform(*config.reverb_rt60_s), gen)
    if rng.random() < config.noise_prob:
        wave = add_noise(wave, rng.uniform(*config.noise_snr_db), gen)
    return wave.clamp(-1.0, 1.0)


def evaluate_dev(model: VoxloopForCTC, dev) -> dict:
    transcribe = torch_transcriber(model)
    hypotheses = [transcribe(int16_to_float(e.samples)) for e in dev]
    model.train()
    return error_rates([e.text for e in dev], hypotheses).as_dict()


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **state}, tmp / TRAINER_STATE)
    if path.exists():
        old = path.with_name(path.name + ".old")
        path.rename(old)
        tmp.rename(path)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(path)


def pretrain(config: PretrainConfig) -> Path:
    """Train (or resume) the base policy; returns the directory of the best weights."""
    torch.set_num_threads(config.num_threads)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain_config.json").write_text(json.dumps(dataclasses.asdict(config), default=str, indent=2))
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    checkpoint = out / CHECKPOINT_DIR
    if (checkpoint / TRAINER_STATE).exists():
        model = VoxloopForCTC.from_pretrained(checkpoint)
        log.info("resuming from %s", checkpoint)
    else:
        model = VoxloopForCTC(
            VoxloopCTCConfig(d_model=config.d_model, num_layers=config.num_layers, num_heads=config.num_heads)
        )
    tokenizer = make_tokenizer(model.config.vocabulary)
    encode = lambda text: encode_targets(tokenizer, text)  # noqa: E731
    log.info("loading corpus from %s", config.corpus_dir)
    train = load_examples(read_manifest(config.corpus_dir / "train.jsonl"), config.corpus_dir, encode)
    dev_rows = read_manifest(config.corpus_dir / "dev.jsonl")
    dev = load_examples(random.Random(0).sample(dev_rows, min(config.dev_utterances, len(dev_rows))),
                        config.corpus_dir, encode)
    hours = sum(len(e.samples) for e in train) / 16000 / 3600
    log.info("train: %d utterances, %.1f h; dev subset: %d", len(train), hours, len(dev))

    batches_per_epoch = sum(1 for _ in duration_batches(train, config.max_batch_seconds, random.Random(0)))
    total_steps = batches_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.peak_lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98))
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, total_steps)
    # epoch_step: batches done in the current epoch, so a resume skips exactly those.
    state = {"epoch": 0, "step": 0, "epoch_step": 0, "best_wer": math.inf, "elapsed_s": 0.0}
    if (checkpoint / TRAINER_STATE).exists():
        saved = torch.load(checkpoint / TRAINER_STATE, weights_only=False)
        optimizer.load_state_dict(saved.pop("optimizer"))
        scheduler.load_state_dict(saved.pop("scheduler"))
        state.update(saved)
    else:
        mean, std = feature_stats(model, [torch.from_numpy(int16_to_float(e.samples))
                                          for e in rng.sample(train, min(400, len(train)))])
        model.frontend.set_feature_stats(mean, std)
    params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2f M parameters; %d steps per epoch, %d in all", params / 1e6, batches_per_epoch, total_steps)

    started = time.monotonic() - state["elapsed_s"]
    last_checkpoint = time.monotonic()
    out_of_time = False
    model.train()
    with (out / HISTORY_FILE).open("a") as history:
        while state["epoch"] < config.epochs and not out_of_time:
            epoch_rng = random.Random(config.seed * 1000 + state["epoch"])
            batches = list(duration_batches(train, config.max_batch_seconds, epoch_rng))
            # On resume mid-epoch, skip the batches already trained on (the epoch's order is seeded).
            bar = tqdm(batches[state["epoch_step"] :], desc=f"epoch {state['epoch'] + 1}/{config.epochs}",
                       unit="batch")
            for batch in bar:
                inputs = collate(batch, [augment(e.samples, config, epoch_rng, gen) for e in batch])
                loss = model(**inputs).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
                optimizer.step()
                scheduler.step()
                state["step"] += 1
                state["epoch_step"] += 1
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if state["step"] % 50 == 0:
                    record = {"step": state["step"], "loss": loss.item(), "grad_norm": float(grad_norm),
                              "lr": scheduler.get_last_lr()[0], "elapsed_s": time.monotonic() - started}
                    history.write(json.dumps(record) + "\n")
                    history.flush()
                state["elapsed_s"] = time.monotonic() - started
                if time.monotonic() - last_checkpoint > config.checkpoint_minutes * 60:
                    save_checkpoint(checkpoint, model, optimizer, scheduler, state)
                    last_checkpoint = time.monotonic()
                if state["elapsed_s"] > config.max_minutes * 60:
                    out_of_time = True
                    log.warning("time budget of %.0f min used up at step %d", config.max_minutes, state["step"])
                    break
            else:
                state["epoch"] += 1
                state["epoch_step"] = 0
            dev_figures = evaluate_dev(model, dev)
            record = {"epoch": state["epoch"], "step": state["step"], "elapsed_s": state["elapsed_s"],
                      **{f"dev_{k}": v for k, v in dev_figures.items()}}
            history.write(json.dumps(record) + "\n")
            history.flush()
            log.info("epoch %d: dev WER %.3f CER %.3f", state["epoch"], dev_figures["wer"], dev_figures["cer"])
            if dev_figures["wer"] < state["best_wer"]:
                state["best_wer"] = dev_figures["wer"]
                model.save_pretrained(out / BEST_DIR)
                tokenizer.save_pretrained(out / BEST_DIR)
            save_checkpoint(checkpoint, model, optimizer, scheduler, state)
            last_checkpoint = time.monotonic()
    return out / BEST_DIR
