"""Rehearsal offline: what a Whisper version learns from a scenario's corrections, cycle by cycle, per learning rate.

    .venv/bin/python bench/rehearsal_schedule.py --version-dir DIR --scenario runs/scenario --corpus corpus \
        [--learning-rates 1e-5,3e-5] [--rehearsal-steps 8] [--cycles 8] [--batch 16] [--eval-cycles 4,8]

A quick stand-in for bench/adaptation.py (minutes instead of ~25 per arm, no server, no gate, torch fp32
greedy decoding instead of the served int8 graphs with context biasing) to choose the rehearsal's settings.
The scenario's feedback stream is cut into `--cycles` batches of `--batch` corrections; the store's
held-out rule (trainer/cycle.is_heldout, 20%) leaves some out, as a cycle would. Per cycle, with the
trainer's own code (whisper_update.whisper_rehearsal, base replay, one AdamW optimizer across cycles):
1. the update, approximated by its supervised term: one pass over the cycle's corrections at the update's
   rate (PPOConfig.two_pass_learning_rate; the reward terms move the domain WER little, docs/benchmarks.md);
2. the rehearsal: up to `--rehearsal-steps` minibatches over every correction so far, at each learning
   rate of `--learning-rates` (0 steps: no rehearsal, the trainer before it).
Domain WER (the scenario's test split), the scenario's anchor WER (base sentences, other voices) and the
gate's anchor WER (the trainer's 100 base dev utterances, training voices) are decoded before the first
cycle and after each of `--eval-cycles`. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch
from voxloop.core.store import FeedbackKind
from voxloop.trainer.base_data import ANCHOR_SEED, BaseData
from voxloop.trainer.config import PPOConfig, TrainerConfig
from voxloop.trainer.cycle import is_heldout
from voxloop.trainer.evaluate import load_samples
from voxloop.trainer.policies import ctc_vocabulary, load_policy_dir
from voxloop.trainer.rewards import FeedbackItem
from voxloop.trainer.whisper_adapter import greedy_wer, read_manifest
from voxloop.trainer.whisper_update import WhisperRolloutContext, whisper_rehearsal, whisper_replay_sampler

HELDOUT_SHARE = 0.2


def _corrections(scenario: Path) -> list[FeedbackItem]:
    rows = read_manifest(scenario / "feedback.jsonl")
    return [FeedbackItem(i + 1, FeedbackKind.CORRECTION, load_samples(scenario / r["path"]), "", r["text"])
            for i, r in enumerate(rows)]


def _gate_anchor(corpus: Path, size: int) -> list[dict]:
    """The gate's anchor rows: the dev utterances trainer/base_data.BaseData picks."""
    rows = sorted(read_manifest(corpus / "dev.jsonl"), key=lambda r: r["id"])
    return random.Random(ANCHOR_SEED).sample(rows, min(size, len(rows)))


def run(args: argparse.Namespace, learning_rate: float) -> list[dict]:
    policy = load_policy_dir(args.version_dir / "policy")
    context = WhisperRolloutContext(policy, args.version_dir / "tokenizer.json")  # freezes what the trainer freezes
    config = PPOConfig(rehearsal_steps=args.rehearsal_steps, rehearsal_learning_rate=learning_rate,
                       replay_per_minibatch=args.replay_per_minibatch)
    update = dataclasses.replace(config, rehearsal_steps=10**6, rehearsal_learning_rate=config.two_pass_learning_rate)
    base = BaseData(args.corpus, ctc_vocabulary(policy), 0, TrainerConfig.replay_pool_size)
    replay = whisper_replay_sampler(base.replay_pool, context)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                  lr=config.two_pass_learning_rate, weight_decay=config.weight_decay)
    corrections = _corrections(args.scenario)
    test = read_manifest(args.scenario / "test.jsonl")
    anchor = read_manifest(args.scenario / "anchor.jsonl")
    gate_anchor = _gate_anchor(args.corpus, TrainerConfig.anchor_size)

    def evaluate(cycle: int, trained: int, seconds: float) -> dict:
        policy.eval()
        row = {"learning_rate": learning_rate, "cycle": cycle, "corrections_trained": trained,
               "domain_wer": greedy_wer(policy, context.tokenizer, test, args.scenario, "test"),
               "anchor_wer": greedy_wer(policy, context.tokenizer, anchor, args.scenario, "anchor"),
               "gate_anchor_wer": greedy_wer(policy, context.tokenizer, gate_anchor, args.corpus, "gate anchor"),
               "training_s": round(seconds, 1)}
        print(json.dumps(row), flush=True)
        return row

    rows, memory, seconds = [evaluate(0, 0, 0.0)], [], 0.0
    for cycle in range(1, args.cycles + 1):
        batch = corrections[(cycle - 1) * args.batch : cycle * args.batch]
        new = [item for item in batch if not is_heldout(item.feedback_id, HELDOUT_SHARE)]
        began = time.perf_counter()
        rng = random.Random(cycle)
        whisper_rehearsal(policy, optimizer, new, update, context, replay, rng)
        if args.rehearsal_steps:
            whisper_rehearsal(policy, optimizer, [*memory, *new], config, context, replay, rng)
        seconds += time.perf_counter() - began
        memory += new
        if cycle in args.eval_cycles:
            rows.append(evaluate(cycle, len(memory), seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version-dir", type=Path, required=True, help="a built Whisper version")
    parser.add_argument("--scenario", type=Path, default=Path("runs/scenario"))
    parser.add_argument("--corpus", type=Path, default=Path("corpus"))
    parser.add_argument("--learning-rates", default="1e-5,3e-5")
    parser.add_argument("--rehearsal-steps", type=int, default=PPOConfig.rehearsal_steps)
    parser.add_argument("--replay-per-minibatch", type=int, default=PPOConfig.replay_per_minibatch)
    parser.add_argument("--cycles", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-cycles", default="4,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    args.eval_cycles = {int(c) for c in args.eval_cycles.split(",")}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [row for rate in args.learning_rates.split(",") for row in run(args, float(rate))]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nrehearsal steps per cycle <= {args.rehearsal_steps}, {args.cycles} cycles of {args.batch} corrections\n")
    print("| rehearsal learning rate | cycle | corrections trained on | domain WER | scenario anchor WER | "
          "gate anchor WER | training s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['learning_rate']:g} | {r['cycle']} | {r['corrections_trained']} | {r['domain_wer']:.1%} | "
              f"{r['anchor_wer']:.1%} | {r['gate_anchor_wer']:.1%} | {r['training_s']} |")


if __name__ == "__main__":
    main()
