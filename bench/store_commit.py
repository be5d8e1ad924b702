"""Feedback store commit latency: what making every final wait for its utterance's commit would cost.

    .venv/bin/python bench/store_commit.py [--store URL] [--batches 1,8,64] [--runs 50]

Inserts utterance records (2 s of 16 kHz audio each, as the server's writer does) in transactions of
each batch size into a fresh SQLite store (WAL, synchronous=FULL: every commit is an fsync) or the
store at `--store`, and prints the commit latency percentiles. A final sent only after its commit
would wait for the batch in flight plus its own; the server sends finals at queueing instead and
measures the resulting window as voxloop_store_write_lag_seconds (README, "Durability").
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from voxloop.core.store import FeedbackStore, UtteranceRecord

AUDIO_S = 2.0


def record() -> UtteranceRecord:
    return UtteranceRecord(id=uuid.uuid4().hex, tenant="bench", user_id="bench", session_id=None,
                           model_version="bench", created_at=datetime.now(UTC), duration_s=AUDIO_S,
                           sample_rate_hz=16000, audio=np.zeros(int(16000 * AUDIO_S), "<i2").tobytes(),
                           hypothesis="the quick brown fox", confidence=0.9, alternatives=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="SQLite path or SQLAlchemy URL (default: a fresh SQLite file)")
    parser.add_argument("--batches", default="1,8,64", help="comma-separated records per transaction")
    parser.add_argument("--runs", type=int, default=50, help="transactions per batch size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.store or Path(tmp) / "bench.sqlite3"
        with FeedbackStore.open(url) as store:
            print("| utterances per commit | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) |")
            print("|---|---|---|---|---|")
            for batch in (int(b) for b in args.batches.split(",")):
                times = []
                for _ in range(args.runs):
                    records = [record() for _ in range(batch)]
                    began = time.perf_counter()
                    store.add_utterances(records)
                    times.append((time.perf_counter() - began) * 1e3)
                p50, p90, p99 = np.percentile(times, [50, 90, 99])
                print(f"| {batch} | {p50:.1f} | {p90:.1f} | {p99:.1f} | {max(times):.1f} |", flush=True)


if __name__ == "__main__":
    main()
