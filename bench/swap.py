"""Hot-swap under load: N real-time streams stay open while new model versions are published one after another.

    .venv/bin/python bench/swap.py [--streams 16] [--versions 5] [--gap-s 6] [--watch-interval-s 1]

Starts `voxloop serve` on a free loopback port with a fresh registry seeded with the shipped model,
opens `--streams` streams (speech-like audio in 100 ms chunks at real-time pace, interim results on,
each on its own connection), and once they run publishes `--versions` new versions (copies of the
shipped version's files under new version ids, through Registry.publish as the trainer does: files, card,
CURRENT), `--gap-s` apart. A poller asks GetModelInfo every 10 ms, so the moment each version serves
is known to ~10 ms. It prints:

- failed RPCs: streams and GetModelInfo calls that ended with a non-OK status (must be 0);
- partial lag (sending the chunk that ends at audio time t -> the first result with audio_processed
  >= t), p50/p99, in steady state vs within 2 s of a swap (from CURRENT written to 2 s after the new
  version serves: loading and warming the new model share the CPU with the streams);
- publish -> serving: from the start of Registry.publish (copy, hash, CURRENT) and from CURRENT written
  to GetModelInfo reporting the new version (the watch interval bounds the second);
- the model version of the finals, checked against the swaps: a final may only carry a version that
  had begun serving before the final arrived.

The output ends with a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from voxloop.clients.audio_files import CHUNK_DURATION_MS, chunk_pcm, float_to_linear16
from voxloop.clients.client import AsyncRecognizerClient, RecognizerClient, VoxloopError, recognition_config
from voxloop.core.registry import CARD_FILE, Registry
from voxloop.server.config import BASE_MODEL_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ holds scripts, not a package
from streaming import (  # noqa: E402
    AUDIO_PROCESSED_TOLERANCE_S,
    CHANNEL_OPTIONS,
    SYNTH_SAMPLE_RATE_HZ,
    cpu_model,
    spawn_server,
    speech_like_audio,
    stop_server,
)

SWAP_WINDOW_S = 2.0
"""Partial lags of chunks sent from CURRENT written to this long after the new version serves count as "swap"."""
POLL_INTERVAL_S = 0.01
WARMUP_S = 4.0
"""Streams run this long before the first publish (their first-chunk costs out of the figures)."""
TAIL_S = 4.0
"""Streams run on this long after the last swap."""
MAX_STREAMS = 128
MAX_VERSIONS = 20


@dataclass
class Lag:
    sent_at: float
    lag_s: float


@dataclass
class StreamOutcome:
    lags: list[Lag] = field(default_factory=list)
    finals: list[tuple[float, str]] = field(default_factory=list)
    """(received at, model_version) of each final."""
    error: str | None = None


@dataclass
class Swap:
    version: str
    publish_started: float
    current_written: float
    serving_at: float | None = None


async def run_stream(target: str, pcm: bytes, rate_hz: int, start_delay_s: float, deadline_s: float) -> StreamOutcome:
    outcome = StreamOutcome()
    pending: collections.deque[tuple[float, float]] = collections.deque()  # (audio end s, sent at)
    clock = time.perf_counter
    chunks = list(chunk_pcm(pcm, rate_hz, CHUNK_DURATION_MS))

    async def paced():
        start, audio_s = clock(), 0.0
        for chunk in chunks:
            await asyncio.sleep(max(0.0, start + audio_s - clock()))
            audio_s += len(chunk) / 2 / rate_hz
            pending.append((audio_s, clock()))
            yield chunk

    await asyncio.sleep(start_delay_s)
    async with AsyncRecognizerClient(target, timeout=deadline_s, options=CHANNEL_OPTIONS) as client:
        try:
            config = recognition_config(rate_hz, interim_results=True)
            async for response in client.streaming_recognize(paced(), config, timeout=deadline_s):
                now = clock()
                for r in response.results:
                    while pending and pending[0][0] <= r.audio_processed + AUDIO_PROCESSED_TOLERANCE_S:
                        sent_at = pending.popleft()[1]
                        outcome.lags.append(Lag(sent_at, now - sent_at))
                    if r.is_final:
                        outcome.finals.append((now, r.model_version))
        except VoxloopError as e:
            outcome.error = e.code
    return outcome


class VersionPoller(threading.Thread):
    """Asks GetModelInfo every POLL_INTERVAL_S; records when each version was first seen serving."""

    def __init__(self, target: str):
        super().__init__(daemon=True, name="version-poller")
        self.target = target
        self.first_seen: dict[str, float] = {}
        self.failures: collections.Counter[str] = collections.Counter()
        self.calls = 0
        self._halt = threading.Event()

    def run(self) -> None:
        with RecognizerClient(self.target, timeout=5.0) as client:
            while not self._halt.is_set():
                self.calls += 1
                try:
                    version = client.get_model_info().version
                    self.first_seen.setdefault(version, time.perf_counter())
                except VoxloopError as e:
                    self.failures[e.code] += 1
                self._halt.wait(POLL_INTERVAL_S)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def publish_versions(registry: Registry, n: int, gap_s: float, poller: VersionPoller, base: str) -> list[Swap]:
    """Publish n copies of the shipped graph, gap_s apart, each once the previous one serves."""
    card = json.loads((BASE_MODEL_DIR / CARD_FILE).read_text())
    kept = {k: v for k, v in card.items() if k not in ("files", "version", "created_at")}
    swaps = []
    for i in range(1, n + 1):
        version = f"{base}-swap{i}"
        started = time.perf_counter()
        registry.publish(version, {name: BASE_MODEL_DIR / name for name in card["files"]},
                         {**kept, "parent_version": swaps[-1].version if swaps else base})
        swaps.append(Swap(version, started, time.perf_counter()))
        deadline = time.perf_counter() + gap_s
        while version not in poller.first_seen and time.perf_counter() < deadline + 30:
            time.sleep(POLL_INTERVAL_S)
        swaps[-1].serving_at = poller.first_seen.get(version)
        time.sleep(max(0.0, deadline - time.perf_counter()))
    return swaps


def percentiles_ms(values_s: list[float]) -> str:
    if not values_s:
        return "- / -"
    p50, p99 = np.percentile(np.asarray(values_s) * 1000, [50, 99])
    return f"{p50:.0f} / {p99:.0f}"


def median_max(values: list[float]) -> str:
    return f"{np.median(values):.2f} / {max(values):.2f}" if values else "-"


def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="voxloop-swap-bench-"))
    try:
        registry = Registry(work / "registry")
        base = registry.seed_from(BASE_MODEL_DIR)
        os.environ["VOXLOOP_MODEL_WATCH_INTERVAL_S"] = str(args.watch_interval_s)
        (work / "data").mkdir()
        process, target = spawn_server(registry.root, work / "data", None)
        try:
            return measure(args, registry, base, target)
        finally:
            stop_server(process)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, registry: Registry, base: str, target: str) -> int:
    duration_s = WARMUP_S + args.versions * args.gap_s + TAIL_S + 2.0
    pcm = float_to_linear16(speech_like_audio(duration_s, SYNTH_SAMPLE_RATE_HZ, seed=args.seed))
    poller = VersionPoller(target)
    poller.start()

    async def streams() -> list[StreamOutcome]:
        spread_s = CHUNK_DURATION_MS / 1000
        tasks = [run_stream(target, pcm, SYNTH_SAMPLE_RATE_HZ, spread_s * i / args.streams, duration_s + 30)
                 for i in range(args.streams)]
        return await asyncio.gather(*tasks)

    outcomes: list[StreamOutcome] = []
    runner = threading.Thread(target=lambda: outcomes.extend(asyncio.run(streams())), name="streams")
    began = time.perf_counter()
    runner.start()
    time.sleep(WARMUP_S)
    swaps = publish_versions(registry, args.versions, args.gap_s, poller, base)
    runner.join()
    poller.stop()

    windows = [(s.current_written, (s.serving_at or s.current_written) + SWAP_WINDOW_S) for s in swaps]
    steady, during = [], []
    for outcome in outcomes:
        for lag in outcome.lags:
            if lag.sent_at < began + WARMUP_S:
                continue
            in_swap = any(start <= lag.sent_at <= end for start, end in windows)
            (during if in_swap else steady).append(lag.lag_s)
    failed_streams = collections.Counter(o.error for o in outcomes if o.error)
    failed = sum(failed_streams.values()) + sum(poller.failures.values())
    publish_to_serving = [s.serving_at - s.publish_started for s in swaps if s.serving_at]
    current_to_serving = [s.serving_at - s.current_written for s in swaps if s.serving_at]
    not_served = [s.version for s in swaps if s.serving_at is None]
    versions_seen = collections.Counter(v for o in outcomes for _, v in o.finals)
    # A final may only carry a version that had begun serving before it arrived (poll granularity aside).
    impossible = sum(1 for o in outcomes for at, v in o.finals
                     if v not in poller.first_seen or poller.first_seen[v] > at + 2 * POLL_INTERVAL_S)

    print(f"{args.streams} real-time streams, {args.versions} versions published {args.gap_s:g} s apart, "
          f"watch interval {args.watch_interval_s:g} s, {cpu_model()} ({os.cpu_count()} cores)")
    print(f"failed RPCs: {failed} (streams: {dict(failed_streams) or 0}, "
          f"GetModelInfo: {dict(poller.failures) or 0} of {poller.calls})")
    print(f"partial lag p50/p99 ms: steady {percentiles_ms(steady)} ({len(steady)} chunks); "
          f"within {SWAP_WINDOW_S:g} s of a swap {percentiles_ms(during)} ({len(during)} chunks)")
    print("publish -> serving s: " + ", ".join(f"{v:.2f}" for v in publish_to_serving)
          + " (CURRENT written -> serving: " + ", ".join(f"{v:.2f}" for v in current_to_serving) + ")")
    if not_served:
        print(f"never served: {', '.join(not_served)}")
    print(f"finals by model version: {dict(sorted(versions_seen.items()))}; finals with a version not yet "
          f"serving: {impossible}")
    print()
    print("| streams | versions | failed RPCs | partial lag p50/p99 steady (ms) | within 2 s of a swap (ms) "
          "| publish -> serving (s, median / max) | CURRENT -> serving (s, median / max) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.streams} | {args.versions} | {failed} | {percentiles_ms(steady)} | {percentiles_ms(during)} "
          f"| {median_max(publish_to_serving)} | {median_max(current_to_serving)} |")
    return 0 if failed == 0 and not not_served and impossible == 0 else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16, help="real-time streams held open (default 16)")
    parser.add_argument("--versions", type=int, default=5, help="versions published one after another (default 5)")
    parser.add_argument("--gap-s", type=float, default=6.0, help="seconds between publishes (default 6)")
    parser.add_argument("--watch-interval-s", type=float, default=1.0,
                        help="the server's model_watch_interval_s (default 1, the server's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic audio")
    args = parser.parse_args(argv)
    if not 1 <= args.streams <= MAX_STREAMS:
        parser.error(f"--streams must be 1..{MAX_STREAMS}")
    if not 1 <= args.versions <= MAX_VERSIONS:
        parser.error(f"--versions must be 1..{MAX_VERSIONS}")
    if not args.gap_s >= 1.0 or not args.watch_interval_s > 0:
        parser.error("--gap-s must be >= 1 and --watch-interval-s > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
