"""Feedback under load: corrections per second and ack latency, and what utterance storage costs streaming.

    .venv/bin/python bench/feedback.py [--model-dir REGISTRY] [--clients 8] [--streams 64]

Drives `voxloop serve` through the public API only, on loopback. It starts the server itself (a free
port, a temporary data dir) with a TOML config written here: the per-user feedback rate limit lifted,
no anonymous mode, and one bearer token per client, all users of tenant "bench". Two fresh servers:

1. `store_utterances = false`: partial lag at `--streams` real-time streams, as bench/streaming.py
   measures it (`run_streams`: from sending the chunk that ends at audio time t to the first result
   with `audio_processed` >= t, pooled; p50/p95);
2. `store_utterances = true` (the default): the same streams; then, on that server, corrections:
   `--utterances` short clips are streamed (unpaced) so that real utterance ids are in the store, and
   `--clients` concurrent clients, each on its own connection and token, submit `--corrections`
   corrections each (varied texts, cycling over the ids) one after another, stopping early at
   `--max-correction-s`. Reported: acked corrections per second (wall clock of the phase), ack
   latency p50/p99 (call to response, i.e. to the commit), failures by status code, and whether the
   store's feedback count matches the distinct (utterance, user) pairs acked (a correction is
   idempotent per pair: the latest text wins).

Issue 4's target: utterance storage moves partial-lag p95 by no more than 10%. The output ends with
markdown tables for docs/benchmarks.md. Exit status 1 if any call failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from voxloop.clients.audio_files import chunk_pcm, float_to_linear16
from voxloop.clients.client import AsyncRecognizerClient, VoxloopError, recognition_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ holds scripts, not a package
from streaming import (  # noqa: E402
    CHANNEL_OPTIONS,
    MAX_STREAMS,
    SYNTH_SAMPLE_RATE_HZ,
    TABLE_HEADER,
    WARMUP_DURATION_S,
    BenchConfig,
    RunSummary,
    bench_audio,
    cpu_model,
    run_streams,
    spawn_server,
    speech_like_audio,
    stop_server,
    table_row,
)

MAX_CLIENTS = 64
MAX_CORRECTIONS_PER_CLIENT = 10_000
MAX_UTTERANCES = 512
MAX_CORRECTION_PHASE_S = 600.0
UTTERANCE_AUDIO_S = 2.0
"""Audio of each clip streamed to create utterances."""
UTTERANCE_STREAM_DEADLINE_S = 60.0
TENANT = "bench"
RATE_LIMIT_LIFTED_PER_S = 1e9
"""feedback_rate_per_s (and burst) for the bench: the limiter still runs, it never refuses."""
LAG_P95_TARGET = 0.10
"""Issue 4: utterance storage may move partial-lag p95 by at most this fraction."""
CORRECTION_PHRASES = ("turn on the kitchen lights", "please call my sister", "at seven o'clock tomorrow morning",
                      "the weather in paris is sunny", "play some quiet music", "remind me to buy milk",
                      "what time is it", "open the garage door", "twenty three degrees")


@dataclass(frozen=True)
class FeedbackBenchConfig:
    clients: int = 8
    """Concurrent correction clients, each with its own connection and bearer token (its own user)."""
    corrections: int = 250
    """Corrections each client submits, one after another."""
    max_correction_s: float = 60.0
    """The correction phase stops here even if the counts are not reached."""
    utterances: int = 32
    """Clips of UTTERANCE_AUDIO_S streamed to create the utterances that get corrected."""
    streams: int = 64
    """Concurrent real-time streams of the partial-lag runs (storage off, then on)."""
    duration_s: float = 20.0
    """Audio per stream of the partial-lag runs."""
    model_dir: Path | None = None
    """The registry to serve; None serves the shipped base model (models/base)."""
    seed: int = 0
    """Seeds the synthetic clips and each client's choice of feedback."""

    def __post_init__(self):
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise ValueError(f"--clients must be 1..{MAX_CLIENTS}, got {self.clients}")
        if not 1 <= self.corrections <= MAX_CORRECTIONS_PER_CLIENT:
            raise ValueError(f"--corrections must be 1..{MAX_CORRECTIONS_PER_CLIENT} per client, "
                             f"got {self.corrections}")
        if not 0 < self.max_correction_s <= MAX_CORRECTION_PHASE_S:
            raise ValueError(f"--max-correction-s must be in (0, {MAX_CORRECTION_PHASE_S:g}], "
                             f"got {self.max_correction_s}")
        if not 1 <= self.utterances <= MAX_UTTERANCES:
            raise ValueError(f"--utterances must be 1..{MAX_UTTERANCES}, got {self.utterances}")
        self.stream_config("127.0.0.1:1")  # the stream count and duration bounds are bench/streaming.py's

    def token(self, client: int) -> str:
        return f"bench-token-{client}"

    def stream_config(self, server: str, server_pid: int | None = None) -> BenchConfig:
        return BenchConfig(streams=(self.streams,), duration_s=self.duration_s, server=server,
                           server_pid=server_pid, seed=self.seed, token=self.token(0))


def write_server_config(config: FeedbackBenchConfig, directory: Path, store_utterances: bool) -> Path:
    """The server's TOML config and its tokens file (one user per client, all of tenant "bench")."""
    tokens = directory / "tokens.toml"
    tokens.write_text("".join(f'[[tokens]]\ntoken = "{config.token(i)}"\ntenant = "{TENANT}"\n'
                              f'user = "bench-user-{i}"\n\n' for i in range(config.clients)))
    path = directory / "server.toml"
    path.write_text(f"store_utterances = {str(store_utterances).lower()}\n"
                    f"feedback_rate_per_s = {RATE_LIMIT_LIFTED_PER_S:.0f}.0\n"
                    f"feedback_burst = {RATE_LIMIT_LIFTED_PER_S:.0f}\n"
                    f"anonymous = false\n"
                    f'tokens_file = "{tokens}"\n'
                    f"max_concurrent_streams = {MAX_STREAMS}\n")
    return path


# --- corrections ---------------------------------------------------------------------------------

def correction_text(rng: random.Random) -> str:
    return " ".join(rng.sample(CORRECTION_PHRASES, k=rng.randint(1, 3)))


async def create_utterances(clients: list[AsyncRecognizerClient], count: int, seed: int) -> list[str]:
    """Stream `count` short clips (unpaced, spread over the clients); the utterance ids of their finals."""
    ids: list[str] = []

    async def stream_clips(client: AsyncRecognizerClient, clip_seeds: range) -> None:
        for clip_seed in clip_seeds:
            pcm = float_to_linear16(speech_like_audio(UTTERANCE_AUDIO_S, SYNTH_SAMPLE_RATE_HZ, clip_seed))
            config = recognition_config(SYNTH_SAMPLE_RATE_HZ, interim_results=False)
            async for response in client.streaming_recognize(chunk_pcm(pcm, SYNTH_SAMPLE_RATE_HZ), config,
                                                             timeout=UTTERANCE_STREAM_DEADLINE_S):
                ids.extend(r.utterance_id for r in response.results if r.is_final and r.utterance_id)

    n = len(clients)
    await asyncio.gather(*(stream_clips(c, range(seed + i, seed + count, n)) for i, c in enumerate(clients)))
    return ids


@dataclass
class ClientCorrections:
    ack_latencies_s: list[float]
    acked_ids: set[str]
    errors: collections.Counter[str]


async def submit_corrections(client: AsyncRecognizerClient, ids: list[str], count: int, deadline: float,
                             rng: random.Random) -> ClientCorrections:
    result = ClientCorrections([], set(), collections.Counter())
    start = rng.randrange(len(ids))
    for k in range(count):
        if time.perf_counter() > deadline:
            break
        utterance_id = ids[(start + k) % len(ids)]
        sent = time.perf_counter()
        try:
            await client.submit_correction(utterance_id, correction_text(rng))
        except VoxloopError as e:
            result.errors[e.code] += 1
            continue
        result.ack_latencies_s.append(time.perf_counter() - sent)
        result.acked_ids.add(utterance_id)
    return result


@dataclass(frozen=True)
class CorrectionSummary:
    clients: int
    utterances: int
    acked: int
    wall_s: float
    ack_ms: tuple[float, float] | None
    """(p50, p99)"""
    errors: dict[str, int]
    pairs_acked: int
    """Distinct (utterance, user) pairs acked: the feedback rows the store should hold."""
    feedback_rows: int

    @property
    def per_s(self) -> float:
        return self.acked / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


async def run_corrections(config: FeedbackBenchConfig, target: str) -> CorrectionSummary:
    clients = [AsyncRecognizerClient(target, token=config.token(i), options=CHANNEL_OPTIONS)
               for i in range(config.clients)]
    try:
        ids = await create_utterances(clients, config.utterances, config.seed)
        if not ids:
            raise RuntimeError(f"streaming {config.utterances} clips gave no final with an utterance_id")
        started = time.perf_counter()
        results = await asyncio.gather(*(
            submit_corrections(c, ids, config.corrections, started + config.max_correction_s,
                               random.Random(config.seed * 1000 + i))
            for i, c in enumerate(clients)
        ))
        wall_s = time.perf_counter() - started
        feedback_rows = (await clients[0].feedback_stats()).feedback
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    latencies = [lag for r in results for lag in r.ack_latencies_s]
    ack_ms = None
    if latencies:
        p50, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 99])
        ack_ms = (float(p50), float(p99))
    return CorrectionSummary(
        clients=config.clients, utterances=len(ids), acked=len(latencies), wall_s=wall_s, ack_ms=ack_ms,
        errors=dict(sum((r.errors for r in results), collections.Counter())),
        pairs_acked=sum(len(r.acked_ids) for r in results), feedback_rows=feedback_rows,
    )


# --- one server per measurement ------------------------------------------------------------------

async def measure_server(config: FeedbackBenchConfig, target: str, pid: int,
                         with_corrections: bool) -> tuple[RunSummary, CorrectionSummary | None]:
    stream_config = config.stream_config(target, pid)
    pcm, rate = bench_audio(stream_config)
    await run_streams(stream_config, 1, pcm[: 2 * int(WARMUP_DURATION_S * rate)], rate)
    lag = await run_streams(stream_config, config.streams, pcm, rate)
    corrections = await run_corrections(config, target) if with_corrections else None
    return lag, corrections


def run_on_fresh_server(config: FeedbackBenchConfig, store_utterances: bool,
                        with_corrections: bool) -> tuple[RunSummary, CorrectionSummary | None]:
    with tempfile.TemporaryDirectory(prefix="voxloop-bench-feedback-") as tmp:
        data_dir = Path(tmp)
        server_config = write_server_config(config, data_dir, store_utterances)
        process, target = spawn_server(config.model_dir, data_dir, server_config, config.token(0))
        try:
            return asyncio.run(measure_server(config, target, process.pid, with_corrections))
        finally:
            stop_server(process)


# --- report --------------------------------------------------------------------------------------

CORRECTIONS_HEADER = ("| clients | utterances | corrections acked | corrections / s | ack p50 (ms) | ack p99 (ms) "
                      "| failed |")
STORAGE_HEADER = "| utterance storage " + TABLE_HEADER


def _separator(header: str) -> str:
    return "|" + "---|" * (header.count("|") - 1)


def corrections_row(s: CorrectionSummary) -> str:
    p50, p99 = ("n/a", "n/a") if s.ack_ms is None else (f"{s.ack_ms[0]:.1f}", f"{s.ack_ms[1]:.1f}")
    failed = str(s.failed) + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(s.errors.items()))})" if s.errors else "")
    return f"| {s.clients} | {s.utterances} | {s.acked} | {s.per_s:.0f} | {p50} | {p99} | {failed} |"


def p95_change(off: RunSummary, on: RunSummary) -> float | None:
    """Relative change of partial-lag p95 with storage on vs off (0.05 = 5% slower with storage)."""
    if off.partial_lag_ms is None or on.partial_lag_ms is None or off.partial_lag_ms[1] <= 0:
        return None
    return on.partial_lag_ms[1] / off.partial_lag_ms[1] - 1


def report(argv: list[str], off: RunSummary, on: RunSummary, corrections: CorrectionSummary) -> str:
    change = p95_change(off, on)
    if change is None:
        verdict = "partial-lag p95 change with storage: n/a (no partial lag measured)"
    else:
        within = "within" if abs(change) <= LAG_P95_TARGET else "OUTSIDE"
        verdict = (f"partial-lag p95 change with storage on vs off: {change:+.1%} "
                   f"({within} issue 4's ±{LAG_P95_TARGET:.0%})")
    lines = [
        f"`{shlex.join(['python', 'bench/feedback.py', *argv])}`",
        "",
        CORRECTIONS_HEADER,
        _separator(CORRECTIONS_HEADER),
        corrections_row(corrections),
        "",
        STORAGE_HEADER,
        _separator(STORAGE_HEADER),
        "| off " + table_row(off),
        "| on " + table_row(on),
        "",
        verdict,
    ]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> FeedbackBenchConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = FeedbackBenchConfig
    parser.add_argument("--clients", type=int, default=defaults.clients, help="concurrent correction clients")
    parser.add_argument("--corrections", type=int, default=defaults.corrections, help="corrections per client")
    parser.add_argument("--max-correction-s", type=float, default=defaults.max_correction_s,
                        help="time bound of the correction phase")
    parser.add_argument("--utterances", type=int, default=defaults.utterances,
                        help=f"{UTTERANCE_AUDIO_S:g} s clips streamed to create utterances to correct")
    parser.add_argument("--streams", type=int, default=defaults.streams, help="streams of the partial-lag runs")
    parser.add_argument("--duration-s", type=float, default=defaults.duration_s, help="audio per stream")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the registry to serve (default: the shipped base model)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    try:
        return FeedbackBenchConfig(clients=args.clients, corrections=args.corrections,
                                   max_correction_s=args.max_correction_s, utterances=args.utterances,
                                   streams=args.streams, duration_s=args.duration_s, model_dir=args.model_dir,
                                   seed=args.seed)
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = parse_args(argv)
    print(f"model {config.model_dir or 'shipped base (models/base)'}; {config.streams} streams of "
          f"{config.duration_s:g} s synthetic audio; {config.clients} correction clients; "
          f"{os.cpu_count()} CPUs ({cpu_model()})", flush=True)
    try:
        off, _ = run_on_fresh_server(config, store_utterances=False, with_corrections=False)
        print("storage off: " + table_row(off), flush=True)
        on, corrections = run_on_fresh_server(config, store_utterances=True, with_corrections=True)
        print("storage on:  " + table_row(on), flush=True)
    except (VoxloopError, RuntimeError, ValueError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    assert corrections is not None
    if corrections.feedback_rows != corrections.pairs_acked:
        print(f"note: the store holds {corrections.feedback_rows} feedback rows for {corrections.pairs_acked} "
              f"distinct (utterance, user) pairs acked", flush=True)
    for s in (off, on):
        if s.uncovered_chunks:
            print(f"note: {s.uncovered_chunks} chunks were never reported processed", flush=True)
    print("\nFor docs/benchmarks.md:\n")
    print(report(argv, off, on, corrections))
    return 0 if off.failed == on.failed == corrections.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
