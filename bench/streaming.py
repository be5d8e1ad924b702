"""Streaming latency under load: N concurrent real-time streams over loopback against a voxloop server.

Against a running server (start it in another terminal; its pid gives the server CPU column):

    .venv/bin/voxloop serve --model-dir DIR --port 50051 &
    .venv/bin/python bench/streaming.py --server 127.0.0.1:50051 --server-pid $!

Or let the bench start `voxloop serve` on a free loopback port, and stop it afterwards:

    .venv/bin/python bench/streaming.py --spawn-server [--model-dir DIR] [--server-config limits.toml] [--workers N]

Each stream sends `--duration-s` of audio (speech-like audio synthesized here, or `--audio FILE`,
looped) in 100 ms LINEAR16 chunks at real-time pace on its own connection, with interim results on;
stream starts are spread over one chunk so the streams do not tick in lockstep; with
`--independent-speakers` each stream also starts at a random point of the audio, so pauses (hence
endpoints and finals) fall at different times across streams. Per N it reports:

- partial lag: from sending the chunk that ends at audio time t to receiving the first result whose
  `audio_processed` >= t (pooled over all chunks of all streams; p50/p95);
- final latency: from the end of sending (half-close) to the last final result received after it, or
  to the end of the stream when no final came after it (p50/p95 over streams). Every stream half-closes
  at the same moment, so with a two-pass model this is the time to drain a burst of N finals at once;
- endpoint final lag: for the finals of endpoints inside the stream (a pause), from sending the chunk
  that ends at the final's `audio_processed` (the endpoint's audio) to receiving the final (pooled);
- server CPU seconds per audio second (utime+stime of the server process, /proc/<pid>/stat; needs
  --spawn-server or --server-pid), and the bench client's own CPU per audio second (it shares the
  machine: read the server figure with that in mind);
- failed streams (any non-OK status), with their status codes.

The output ends with a markdown table for docs/benchmarks.md. The load is bounded (at most
MAX_STREAMS streams of at most MAX_DURATION_S each) and goes to loopback addresses only.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import dataclasses
import ipaddress
import math
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from voxloop.clients.audio_files import CHUNK_DURATION_MS, chunk_pcm, float_to_linear16, read_audio_file
from voxloop.clients.client import AsyncRecognizerClient, RecognizerClient, VoxloopError, recognition_config

DEFAULT_STREAMS = (1, 16, 64, 128)
MAX_STREAMS = 512
MAX_DURATION_S = 300.0
SYNTH_SAMPLE_RATE_HZ = 16000
AUDIO_PROCESSED_TOLERANCE_S = 1e-3
"""`audio_processed` is a float32 on the wire; a chunk counts as covered within this slack."""
STREAM_DEADLINE_SLACK_S = 30.0
"""A stream's gRPC deadline: its audio's duration plus this."""
SERVER_START_TIMEOUT_S = 120.0
SERVER_STOP_GRACE_S = 30.0
WARMUP_DURATION_S = 1.0
# Each stream gets its own TCP connection, as separate applications would (gRPC otherwise shares one).
CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


@dataclass(frozen=True)
class BenchConfig:
    streams: tuple[int, ...] = DEFAULT_STREAMS
    """Concurrent streams, one run per value."""
    duration_s: float = 20.0
    """Audio per stream, sent at real-time pace."""
    server: str = "127.0.0.1:50051"
    """HOST:PORT of the server (loopback only)."""
    server_pid: int | None = None
    """The server's pid, for the CPU column (set by --spawn-server)."""
    audio: Path | None = None
    """A WAV/FLAC file to stream (looped or cut to duration_s); None synthesizes speech-like audio."""
    chunk_ms: int = CHUNK_DURATION_MS
    """Audio per message."""
    seed: int = 0
    """Seeds the synthetic audio and the streams' start offsets."""
    token: str | None = None
    """Bearer token sent with every call (servers with a tokens_file); None calls anonymously."""
    independent_speakers: bool = False
    """Each stream starts at a random point of the (looped) audio, so streams pause at different times as
    independent speakers do; off, every stream reaches each pause, hence each endpoint, within one chunk
    of the others (the worst case for a model whose finals cost more than its chunks)."""

    def __post_init__(self):
        if not self.streams or any(not 1 <= n <= MAX_STREAMS for n in self.streams):
            raise ValueError(f"--streams must be 1..{MAX_STREAMS}, got {self.streams}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"--duration-s must be in (0, {MAX_DURATION_S:g}], got {self.duration_s}")
        _require_loopback(self.server)


def _require_loopback(target: str) -> None:
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, int(port))}
    except (OSError, ValueError) as e:
        raise ValueError(f"--server {target!r}: cannot resolve ({e}); use HOST:PORT on loopback") from e
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"--server {target!r} is not a loopback address; this load generator only targets "
                         f"127.0.0.1 / ::1 (run it on the server's machine)")


# --- audio ---------------------------------------------------------------------------------------

VOWEL_FORMANTS_HZ = ((730, 1090), (270, 2290), (530, 1840), (570, 840), (300, 870), (660, 1720), (490, 1350))
"""(F1, F2) of a few English vowels (Peterson & Barney, male averages)."""


def speech_like_audio(duration_s: float, sample_rate_hz: int = SYNTH_SAMPLE_RATE_HZ, seed: int = 0) -> np.ndarray:
    """Voiced syllables with vowel formants and pitch glides, grouped into words and phrases.

    Not speech, but what matters to a recognizer's load: energy the endpointer sees as voice, pauses
    between words, and phrase breaks long enough (0.6-1.6 s) to sometimes end an utterance. (S,) float32.
    """
    rng = np.random.default_rng(seed)
    total = int(duration_s * sample_rate_hz)
    out = np.zeros(total, dtype=np.float32)
    pos = int(0.3 * sample_rate_hz)
    words_in_phrase = 0
    while pos < total:
        for _ in range(rng.integers(1, 4)):  # syllables of one word
            n = int(rng.uniform(0.12, 0.25) * sample_rate_hz)
            t = np.arange(n) / sample_rate_hz
            f0 = rng.uniform(100, 180) * (1 + rng.uniform(-0.15, 0.15) * t / t[-1])  # (n,) Hz, a glide
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate_hz
            f1, f2 = VOWEL_FORMANTS_HZ[rng.integers(len(VOWEL_FORMANTS_HZ))]
            mean_f0 = float(f0.mean())
            syllable = np.zeros(n)
            for k in range(1, int(4000 / mean_f0)):
                gain = np.exp(-(((k * mean_f0 - f1) / 150) ** 2)) + 0.5 * np.exp(-(((k * mean_f0 - f2) / 200) ** 2))
                syllable += (gain + 0.02) * np.sin(k * phase)
            envelope = np.sin(np.pi * np.arange(n) / n) ** 0.5
            syllable *= envelope * rng.uniform(0.15, 0.35) / max(1e-9, np.abs(syllable).max())
            if pos < total:  # a word's later syllables may start past the end (a negative slice would misfit)
                end = min(total, pos + n)
                out[pos:end] += syllable[: end - pos]
            pos += n + int(rng.uniform(0.02, 0.06) * sample_rate_hz)
        words_in_phrase += 1
        pause_s = rng.uniform(0.08, 0.2)
        if words_in_phrase >= rng.integers(3, 9):
            pause_s, words_in_phrase = rng.uniform(0.6, 1.6), 0
        pos += int(pause_s * sample_rate_hz)
    out += (1e-3 * rng.standard_normal(total)).astype(np.float32)  # a quiet room, not digital silence
    return np.clip(out, -1, 1)


def bench_audio(config: BenchConfig) -> tuple[bytes, int]:
    """Mono LINEAR16 of exactly duration_s, and its rate."""
    if config.audio is None:
        rate = SYNTH_SAMPLE_RATE_HZ
        return float_to_linear16(speech_like_audio(config.duration_s, rate, config.seed)), rate
    audio = read_audio_file(config.audio)
    needed_bytes = 2 * int(config.duration_s * audio.sample_rate_hz)
    repeats = math.ceil(needed_bytes / len(audio.pcm))
    return (audio.pcm * repeats)[:needed_bytes], audio.sample_rate_hz


# --- one stream ----------------------------------------------------------------------------------

@dataclass
class StreamResult:
    partial_lags_s: list[float] = field(default_factory=list)
    final_latency_s: float | None = None
    endpoint_final_lags_s: list[float] = field(default_factory=list)
    uncovered_chunks: int = 0
    """Chunks no result ever reported as processed (audio_processed never reached their end)."""
    error: str | None = None
    """The status code name of a failed stream."""


async def run_stream(client: AsyncRecognizerClient, chunks: Sequence[bytes], sample_rate_hz: int,
                     start_delay_s: float, deadline_s: float) -> StreamResult:
    result = StreamResult()
    pending: collections.deque[tuple[float, float]] = collections.deque()  # (audio end s, sent at)
    sent: list[tuple[float, float]] = []  # every chunk's (audio end s, sent at), for finals' lag
    end_sent: list[float] = []
    clock = time.perf_counter

    async def paced() -> AsyncIterator[bytes]:
        start = clock()
        audio_s = 0.0
        for chunk in chunks:
            await asyncio.sleep(max(0.0, start + audio_s - clock()))  # chunk leaves when its audio is "heard"
            audio_s += len(chunk) / 2 / sample_rate_hz
            pending.append((audio_s, clock()))
            sent.append(pending[-1])
            yield chunk
        end_sent.append(clock())

    await asyncio.sleep(start_delay_s)
    last_final = None
    try:
        config = recognition_config(sample_rate_hz, interim_results=True)
        async for response in client.streaming_recognize(paced(), config, timeout=deadline_s):
            now = clock()
            for r in response.results:
                while pending and pending[0][0] <= r.audio_processed + AUDIO_PROCESSED_TOLERANCE_S:
                    result.partial_lags_s.append(now - pending.popleft()[1])
                if r.is_final and end_sent:
                    last_final = now
                elif r.is_final:
                    chunk = bisect.bisect_left(sent, (r.audio_processed - AUDIO_PROCESSED_TOLERANCE_S, 0.0))
                    if chunk < len(sent):
                        result.endpoint_final_lags_s.append(now - sent[chunk][1])
    except VoxloopError as e:
        result.error = e.code
        return result
    stream_end = clock()
    result.uncovered_chunks = len(pending)
    if end_sent:
        result.final_latency_s = (last_final if last_final is not None else stream_end) - end_sent[0]
    return result


# --- one run of N streams ------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSummary:
    streams: int
    partial_lag_ms: tuple[float, float] | None
    """(p50, p95)"""
    final_latency_ms: tuple[float, float] | None
    server_cpu_per_audio_s: float | None
    client_cpu_per_audio_s: float
    failed: int
    errors: dict[str, int]
    uncovered_chunks: int
    endpoint_final_lag_ms: tuple[float, float] | None = None
    """(p50, p95) of the finals of endpoints inside the streams (none when no stream paused)."""


def _p50_p95_ms(values_s: list[float]) -> tuple[float, float] | None:
    if not values_s:
        return None
    p50, p95 = np.percentile(np.asarray(values_s) * 1000, [50, 95])
    return float(p50), float(p95)


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), of its waited-for children and of its live descendants
    (the workers of `voxloop serve --workers N`), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": the name may hold spaces
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    total = (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")
    for child in _children(pid):
        try:
            total += process_cpu_seconds(child)
        except FileNotFoundError:  # exited meanwhile: its time moves to our cutime once reaped
            continue
    return total


def _children(pid: int) -> list[int]:
    children = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return children
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue
    return children


async def run_streams(config: BenchConfig, n: int, pcm: bytes, sample_rate_hz: int) -> RunSummary:
    chunks = list(chunk_pcm(pcm, sample_rate_hz, config.chunk_ms))
    audio_s = len(pcm) / 2 / sample_rate_hz
    rng = random.Random(config.seed + n)
    clients = [AsyncRecognizerClient(config.server, token=config.token, options=CHANNEL_OPTIONS) for _ in range(n)]
    try:
        # Connect every stream's channel before the clock starts: the figures are about streaming.
        await asyncio.gather(*(c.get_model_info() for c in clients))
        server_cpu_0 = process_cpu_seconds(config.server_pid) if config.server_pid else None
        client_cpu_0 = time.process_time()
        def phase(stream_chunks: list[bytes]) -> list[bytes]:
            if not config.independent_speakers:
                return stream_chunks
            k = rng.randrange(len(stream_chunks))
            return stream_chunks[k:] + stream_chunks[:k]

        results = await asyncio.gather(*(
            run_stream(c, phase(chunks), sample_rate_hz, rng.uniform(0, config.chunk_ms / 1000),
                       audio_s + STREAM_DEADLINE_SLACK_S)
            for c in clients
        ))
        client_cpu = time.process_time() - client_cpu_0
        server_cpu = process_cpu_seconds(config.server_pid) - server_cpu_0 if config.server_pid else None
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    errors = collections.Counter(r.error for r in results if r.error)
    ok = [r for r in results if not r.error]
    total_audio_s = n * audio_s
    return RunSummary(
        streams=n,
        partial_lag_ms=_p50_p95_ms([lag for r in ok for lag in r.partial_lags_s]),
        final_latency_ms=_p50_p95_ms([r.final_latency_s for r in ok if r.final_latency_s is not None]),
        endpoint_final_lag_ms=_p50_p95_ms([lag for r in ok for lag in r.endpoint_final_lags_s]),
        server_cpu_per_audio_s=None if server_cpu is None else server_cpu / total_audio_s,
        client_cpu_per_audio_s=client_cpu / total_audio_s,
        failed=sum(errors.values()),
        errors=dict(errors),
        uncovered_chunks=sum(r.uncovered_chunks for r in ok),
    )


# --- report --------------------------------------------------------------------------------------

TABLE_HEADER = ("| streams | partial lag p50 (ms) | partial lag p95 (ms) | final latency p50 (ms) | "
                "final latency p95 (ms) | endpoint final lag p50 / p95 (ms) | server CPU s / audio s | "
                "client CPU s / audio s | failed |")


def _fmt_pair(pair: tuple[float, float] | None) -> tuple[str, str]:
    return ("n/a", "n/a") if pair is None else (f"{pair[0]:.0f}", f"{pair[1]:.0f}")


def table_row(s: RunSummary) -> str:
    lag, final = _fmt_pair(s.partial_lag_ms), _fmt_pair(s.final_latency_ms)
    endpoint_final = " / ".join(_fmt_pair(s.endpoint_final_lag_ms))
    server_cpu = "n/a" if s.server_cpu_per_audio_s is None else f"{s.server_cpu_per_audio_s:.4f}"
    failed = str(s.failed) + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(s.errors.items()))})" if s.errors else "")
    return (f"| {s.streams} | {lag[0]} | {lag[1]} | {final[0]} | {final[1]} | {endpoint_final} | {server_cpu} | "
            f"{s.client_cpu_per_audio_s:.4f} | {failed} |")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


# --- a server of our own -------------------------------------------------------------------------

def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(model_dir: Path | None, data_dir: Path, server_config: Path | None,
                 token: str | None = None, workers: int = 1) -> tuple[subprocess.Popen, str]:
    """Start `voxloop serve` on a free loopback port; returns once it answers GetModelInfo.

    model_dir None serves the shipped base model (seeded into data_dir's registry); `token` is what the
    readiness probe sends to a server with a tokens_file; `workers` > 1 runs that many server processes
    on the port (their metrics off: consecutive free ports are not guaranteed here).
    """
    port = _free_loopback_port()
    metrics_port = _free_loopback_port() if workers == 1 else 0
    command = [sys.executable, "-m", "voxloop.clients.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--metrics-port", str(metrics_port), "--data-dir", str(data_dir), "--workers", str(workers)]
    if model_dir is not None:
        command += ["--model-dir", str(model_dir)]
    if server_config is not None:
        command += ["--config", str(server_config)]
    log_path = data_dir / "server.log"
    print(f"starting: {shlex.join(command)} (log: {log_path})", file=sys.stderr)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    with RecognizerClient(target, token=token, timeout=2.0) as client:
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the server exited with status {process.returncode}:\n{tail}")
            try:
                client.get_model_info()
                # One worker answering is not all of them: wait until each has said it listens.
                if log_path.read_text(errors="replace").count(f"listening on {target}") >= workers:
                    return process, target
                time.sleep(0.2)
            except VoxloopError:
                if time.monotonic() > deadline:
                    stop_server(process)
                    raise RuntimeError(f"the server did not answer within {SERVER_START_TIMEOUT_S:g} s") from None
                time.sleep(0.2)


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()  # SIGTERM: the server's graceful shutdown
    try:
        process.wait(SERVER_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- main ----------------------------------------------------------------------------------------

async def run_sweep(config: BenchConfig) -> list[RunSummary]:
    pcm, rate = bench_audio(config)
    with RecognizerClient(config.server, token=config.token) as client:
        info = client.get_model_info()
    print(f"server {config.server}, model {info.version}; {config.duration_s:g} s of "
          f"{'synthetic speech-like audio' if config.audio is None else config.audio} per stream at {rate} Hz, "
          f"{config.chunk_ms} ms chunks, real-time pace; {os.cpu_count()} CPUs ({cpu_model()})",
          flush=True)
    warmup = pcm[: 2 * int(WARMUP_DURATION_S * rate)]
    await run_streams(config, 1, warmup, rate)
    print(TABLE_HEADER, flush=True)
    summaries = []
    for n in config.streams:
        summary = await run_streams(config, n, pcm, rate)
        summaries.append(summary)
        print(table_row(summary), flush=True)
        if summary.uncovered_chunks:
            print(f"  note: {summary.uncovered_chunks} chunks were never reported processed "
                  f"(audio_processed stopped short of them)", flush=True)
    return summaries


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=lambda v: tuple(int(x) for x in v.split(",")),
                        default=DEFAULT_STREAMS, help="comma-separated stream counts (default 1,16,64,128)")
    parser.add_argument("--duration-s", type=float, default=BenchConfig.duration_s)
    parser.add_argument("--server", default=BenchConfig.server, help="HOST:PORT of a running server (loopback)")
    parser.add_argument("--server-pid", type=int, default=None, help="the running server's pid (CPU column)")
    parser.add_argument("--audio", type=Path, default=None, help="WAV/FLAC to stream (default: synthesized)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--independent-speakers", action="store_true",
                        help="start each stream at a random point of the audio (pauses, hence finals, do not "
                             "coincide across streams)")
    parser.add_argument("--token", default=None, help="bearer token, for a server with a tokens_file")
    parser.add_argument("--spawn-server", action="store_true", help="start `voxloop serve` for the run")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="with --spawn-server: the registry to serve (default: the shipped base model)")
    parser.add_argument("--server-config", type=Path, default=None,
                        help="with --spawn-server: a TOML config (e.g. raising the concurrent-stream limit)")
    parser.add_argument("--workers", type=int, default=1,
                        help="with --spawn-server: `voxloop serve --workers N` (server CPU counts every worker)")
    args = parser.parse_args(argv)
    try:
        config = BenchConfig(streams=args.streams, duration_s=args.duration_s, server=args.server,
                             server_pid=args.server_pid, audio=args.audio, seed=args.seed, token=args.token,
                             independent_speakers=args.independent_speakers)
    except ValueError as e:
        parser.error(str(e))
    return config, args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    process = None
    with tempfile.TemporaryDirectory(prefix="voxloop-bench-") as tmp:
        try:
            if args.spawn_server:
                process, target = spawn_server(args.model_dir, Path(tmp), args.server_config, config.token,
                                               args.workers)
                config = dataclasses.replace(config, server=target, server_pid=process.pid)
            summaries = asyncio.run(run_sweep(config))
        except (VoxloopError, RuntimeError, ValueError) as e:
            print(f"bench: error: {e}", file=sys.stderr)
            return 1
        finally:
            if process is not None:
                stop_server(process)
    print("\nFor docs/benchmarks.md:\n")
    print(f"`{shlex.join(['python', 'bench/streaming.py', *(argv if argv is not None else sys.argv[1:])])}`\n")
    print(TABLE_HEADER)
    print("|---" * TABLE_HEADER.count("| ") + "|")
    for s in summaries:
        print(table_row(s))
    return 0 if all(s.failed == 0 for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
