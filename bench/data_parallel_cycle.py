"""Cycle time of the online trainer at 1 and 2 processes (torchrun, gloo on the CPU), on the same update.

    VOXLOOP_SHIPPED_MODEL_DIR=models/base python bench/data_parallel_cycle.py --corpus corpus --items 64 \\
        --configs 1x1,1x2,2x1

A template (a registry seeded with the shipped model, a SQLite store holding `--items` corrections of the
corpus's `--split` utterances, their reference texts as the corrections) is copied once per configuration
PxT (P processes of T torch threads each), and `voxloop train --once --json` runs on the copy: plain for
P = 1, under `python -m torch.distributed.run --nproc_per_node P` otherwise. Every configuration makes
the same update: gradient accumulation max(P) / P, so one optimizer step covers the same minibatches
(trainer/distributed.py). Reported per configuration: the cycle's own stage times (read, update =
rollout + PPO epochs, export + parity, gate) from its report, the wall time of the command (interpreter
and imports included), and the largest parameter difference of the published policy from the first
configuration's (equal up to float summation order).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import torch
from voxloop.core.pcm import float_to_pcm16
from voxloop.core.registry import Registry
from voxloop.core.store import FeedbackStore, UtteranceRecord
from voxloop.trainer.data import read_manifest
from voxloop.trainer.evaluate import load_samples
from voxloop.trainer.policies import load_policy_dir
from voxloop.trainer.release import POLICY_DIR

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_template(work: Path, shipped: Path, corpus: Path, split: str, items: int) -> Path:
    template = work / "template"
    Registry(template / "registry").seed_from(shipped)
    rows = sorted(read_manifest(corpus / f"{split}.jsonl"), key=lambda r: r["id"])[:items]
    with FeedbackStore.open(template / "feedback.sqlite3") as store:
        for i, row in enumerate(rows):
            samples = load_samples(corpus / row["path"])
            utterance_id = uuid.uuid4().hex
            store.add_utterance(UtteranceRecord(
                id=utterance_id, tenant="default", user_id=None, session_id=None, model_version="bench",
                created_at=datetime.now(UTC), duration_s=len(samples) / 16000, sample_rate_hz=16000,
                audio=float_to_pcm16(samples), hypothesis=""))
            store.submit_feedback(utterance_id, tenant="default", user=f"user-{i}", kind="correction", reward=0.0,
                                  corrected_text=row["text"])
    return template


def run_config(template: Path, work: Path, corpus: Path, processes: int, threads: int, accumulation: int) -> dict:
    root = shutil.copytree(template, work / f"{processes}x{threads}")
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
                     "127.0.0.1", "--master_port", str(_free_port())]
    command = [*launcher, "-m", "voxloop.clients.cli", "train", "--once", "--json", "--data-dir", str(root / "data"),
               "--store", str(root / "feedback.sqlite3"), "--registry", str(root / "registry"), "--corpus",
               str(corpus), "--threads", str(threads), "--gradient-accumulation-steps", str(accumulation)]
    started = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True)
    wall_s = time.monotonic() - started
    if run.returncode != 0:
        raise RuntimeError(f"{processes}x{threads} failed:\n{run.stderr[-3000:]}")
    report = json.loads(run.stdout)
    registry = Registry(root / "registry")
    version = report.get("version_out")
    policy = load_policy_dir(registry.version_dir(version) / POLICY_DIR) if version else None
    return {"config": f"{processes}x{threads}", "processes": processes, "threads": threads,
            "accumulation": accumulation, "outcome": report["outcome"], "steps": report["steps"],
            "seconds": report["seconds"], "wall_s": round(wall_s, 1), "policy": policy}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / "corpus")
    parser.add_argument("--split", default="test_heldout_flite")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--configs", default="1x1,2x1", help="PxT,... (P processes of T torch threads)")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a fresh temp dir)")
    args = parser.parse_args()
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    shipped = Path(os.environ.get("VOXLOOP_SHIPPED_MODEL_DIR", ROOT / "models" / "base"))
    most = max(p for p, _ in configs)
    with tempfile.TemporaryDirectory(prefix="voxloop-dp-bench-") as tmp:
        work = args.work or Path(tmp)
        template = build_template(work, shipped, args.corpus, args.split, args.items)
        results = []
        for processes, threads in configs:
            result = run_config(template, work, args.corpus, processes, threads, most // processes)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "policy"}), flush=True)
    reference = results[0]["policy"].state_dict() if results[0]["policy"] is not None else None
    print(f"\n{shipped.name} ({args.items} corrections of {args.split}), {os.cpu_count()} CPUs; "
          f"`python {' '.join(sys.argv)}`\n")
    print("| processes x threads | minibatches per step per process | update s | export s | gate s | cycle s | "
          "command wall s | max abs param diff vs first |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        diff = "n/a"
        if reference is not None and r["policy"] is not None:
            state = r["policy"].state_dict()
            diff = f"{max(float((state[k].float() - v.float()).abs().max()) for k, v in reference.items()):.1e}"
        s = r["seconds"]
        print(f"| {r['config']} | {r['accumulation']} | {s.get('update', 0):.1f} | {s.get('export', 0):.1f} | "
              f"{s.get('gate', 0):.1f} | {s.get('total', 0):.1f} | {r['wall_s']:.1f} | {diff} |")
    return 0 if all(r["outcome"] == results[0]["outcome"] for r in results) else 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
