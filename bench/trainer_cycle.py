"""Online-trainer bench: seconds per cycle and what each objective does on a small voice adaptation.

    python bench/trainer_cycle.py --objective ppo+sft --cycles 3 --out runs/bench-trainer/ppo+sft.json

Setup: a fresh registry seeded with --shipped (models/base, or a built Whisper version), a fresh
store. The "users" speak with a voice the base model never heard (the corpus's test_heldout_flite
split, base WER ~87%) and correct every transcript. Each cycle gets `--items` new corrections
(disjoint rows), runs `run_cycle` with the default TrainerConfig (anchor = 100 dev utterances,
replay from train, held-out share 0.2, the 1-point anchor margin), then the serving model is scored
on `--eval` other utterances of that voice (domain WER) -- rows never given as feedback. Prints one
JSON object per cycle and writes them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import torch
from voxloop.core.pcm import float_to_pcm16
from voxloop.core.registry import Registry
from voxloop.core.store import FeedbackStore, UtteranceRecord
from voxloop.trainer.config import DEFAULT_CORPUS_DIR, TrainerConfig
from voxloop.trainer.cycle import run_cycle
from voxloop.trainer.data import read_manifest
from voxloop.trainer.evaluate import load_samples
from voxloop.trainer.gate import score_version

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "base"


def add_corrections(store: FeedbackStore, rows: list[dict], corpus: Path) -> None:
    for row in rows:
        samples = load_samples(corpus / row["path"])
        utterance_id = uuid.uuid4().hex
        store.add_utterance(UtteranceRecord(
            id=utterance_id, tenant="default", user_id=None, session_id=None, model_version="bench",
            created_at=datetime.now(UTC), duration_s=len(samples) / 16000, sample_rate_hz=16000,
            audio=float_to_pcm16(samples), hypothesis=""))
        store.submit_feedback(utterance_id, tenant="default", user=f"user-{len(row['id']) % 7}-{uuid.uuid4().hex[:4]}",
                              kind="correction", reward=0.0, corrected_text=row["text"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS_DIR)
    parser.add_argument("--split", default="test_heldout_flite")
    parser.add_argument("--objective", default="ppo+sft", choices=("ppo", "sft", "ppo+sft"))
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--eval", type=int, default=150)
    parser.add_argument("--no-gate", action="store_true", help="publish every candidate (anchor margins 1.0)")
    parser.add_argument("--no-adapt", action="store_true", help="no text-side adaptation (adapt_lexicon off)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a PPOConfig field (e.g. --set epochs=2 --set init_kl_coef=1.0)")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a fresh temp dir)")
    parser.add_argument("--shipped", type=Path, default=SHIPPED,
                        help="version directory to start from (default models/base; a built Whisper version: "
                             "<data_dir>/shipped/whisper-tiny.en-v1)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=TrainerConfig.num_threads,
                        help="torch intra-op threads (TrainerConfig.num_threads, `voxloop train --threads`; default "
                             "%(default)s, the in-process trainer's, which leaves the other core to serving)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    work = args.work or Path(f"/tmp/voxloop-bench-trainer-{uuid.uuid4().hex[:8]}")
    rows = read_manifest(args.corpus / f"{args.split}.jsonl")
    eval_rows, feedback_rows = rows[-args.eval:], rows[: -args.eval]
    registry = Registry(work / "registry")
    registry.seed_from(args.shipped)
    config = TrainerConfig(data_dir=work, corpus_dir=args.corpus, num_threads=args.threads)
    config = config.with_objective(args.objective)
    if args.set:
        types = {f.name: f.type for f in dataclasses.fields(config.ppo)}
        overrides = {}
        for item in args.set:
            name, value = item.split("=", 1)
            kind = types[name]
            overrides[name] = (value.lower() in ("1", "true") if kind == "bool" else
                               int(value) if kind == "int" else float(value) if "float" in kind else value)
        config = dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, **overrides))
    if args.no_adapt:
        config = dataclasses.replace(config, adapt_lexicon=False)
    if args.no_gate:
        config = dataclasses.replace(config, max_anchor_regression=1.0, max_total_anchor_regression=1.0,
                                     heldout_share=0.0)
    eval_pairs = [(load_samples(args.corpus / r["path"]), r["text"]) for r in eval_rows]
    results = []
    base_domain = score_version(registry.version_dir(registry.current_version()), eval_pairs)
    print(json.dumps({"cycle": 0, "version": registry.current_version(), "domain_wer": base_domain.wer}), flush=True)
    with FeedbackStore.sqlite(work / "feedback.sqlite3") as store:
        for cycle in range(args.cycles):
            add_corrections(store, feedback_rows[cycle * args.items : (cycle + 1) * args.items], args.corpus)
            started = time.monotonic()
            report = run_cycle(store, registry, config)
            elapsed = time.monotonic() - started
            serving = registry.current_version()
            domain = score_version(registry.version_dir(serving), eval_pairs)
            peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            gate = report.gate or {}
            result = {
                "cycle": cycle + 1, "objective": args.objective, "overrides": args.set, "threads": args.threads,
                "outcome": report.outcome,
                "version": serving,
                "seconds": round(elapsed, 1), "stage_seconds": report.seconds, "steps": report.steps,
                "domain_wer": domain.wer, "domain_cer": domain.cer,
                "anchor_wer_serving": gate.get("anchor_wer_serving"),
                "anchor_wer_candidate": gate.get("anchor_wer_candidate"),
                "heldout_wer_serving": gate.get("heldout_wer_serving"),
                "heldout_wer_candidate": gate.get("heldout_wer_candidate"), "heldout_n": gate.get("heldout_utterances"),
                "reward_before": report.reward_before, "reward_after": report.reward_after,
                "kl": report.last_step.kl if report.last_step else None,
                "kl_coef": report.last_step.kl_coef if report.last_step else None,
                "peak_rss_mib": round(peak_rss_mib), "load_average": [round(v, 2) for v in os.getloadavg()],
            }
            results.append(result)
            print(json.dumps(result), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"base_domain_wer": base_domain.wer, "cycles": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
