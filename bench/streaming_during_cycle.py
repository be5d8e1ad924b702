"""Streaming latency while the in-process trainer runs a cycle, against the same load with it idle.

    .venv/bin/python bench/streaming_during_cycle.py [--streams 64] [--duration-s 30] [--feedback 64]
        [--scenario runs/scenario] [--audio FILE] [--out runs/bench-during-cycle]

Design invariant 8: training never starves serving. `voxloop serve` runs its trainer in a thread of
the same process (nice 10, one torch thread); this measures what that costs the streams:

1. builds the adaptation scenario (trainer/scenario.py) and starts `voxloop serve` with the
   in-process trainer at its defaults, except `min_feedback` = 90% of `--feedback` (64 by default);
2. streams `--feedback` scenario utterances and corrects each, which makes the trainer start a cycle
   (the bench waits for the server log's "cycle on" line);
3. at once runs `--streams` real-time streams of `--duration-s` (bench/streaming.py's load: partial
   lag, final latency, server CPU per audio second, failures) and reads from the log's timestamps how
   much of the load ran inside the cycle (keep --duration-s below the cycle's length);
4. waits for the cycle to end, then runs the same load again with the trainer idle.

Prints both rows as a markdown table for docs/benchmarks.md, with the cycle's outcome and duration.
The load goes to loopback only and is bounded like bench/streaming.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

from voxloop.clients.client import RecognizerClient
from voxloop.clients.demo import USERS, ServerProcess, trainer_min_feedback, transcribe_all, user_token
from voxloop.trainer.scenario import ScenarioConfig, build_scenario, load_scenario

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ holds scripts, not a package
from streaming import TABLE_HEADER, BenchConfig, RunSummary, bench_audio, run_streams, table_row  # noqa: E402

CYCLE_START_MARK = "cycle on "
"""trainer/cycle.py logs this when a cycle begins (the parent version and the batch size follow)."""
CYCLE_END_MARK = "trainer cycle: "
"""trainer/loop.py logs this when a cycle ends (its outcome and version follow)."""
LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"
LOG_TIME_CHARS = 23
CYCLE_START_TIMEOUT_S = 60.0
CYCLE_END_TIMEOUT_S = 600.0


def wait_for_log(server: ServerProcess, mark: str, timeout_s: float) -> str:
    """Block until the server log has a line with `mark`; returns that line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in server.log_tail(1_000_000).splitlines():
            if mark in line:
                return line
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited: {server.log_tail()}")
        time.sleep(0.2)
    raise RuntimeError(f"no {mark.strip()!r} line in {server.log_path} within {timeout_s:g} s")


def correct_feedback(server: ServerProcess, utterances) -> int:
    """Each scripted user streams their share of `utterances` and corrects every final; returns the count."""
    sent = 0
    for user in range(USERS):
        mine = utterances[user::USERS]
        heard = transcribe_all(server.target, [u.path for u in mine], token=user_token(user))
        with RecognizerClient(server.target, token=user_token(user)) as client:
            for final, utterance in zip(heard, mine, strict=True):
                client.submit_correction(final.utterance_id, utterance.text)
                sent += 1
    return sent


def log_time(line: str) -> datetime:
    """The timestamp that starts a line of the server's text log ("2026-12-01 19:13:41,912 INFO ...")."""
    return datetime.strptime(line[:LOG_TIME_CHARS], LOG_TIME_FORMAT)


def run(args: argparse.Namespace) -> int:
    scenario = load_scenario(build_scenario(ScenarioConfig(out_dir=args.scenario)))
    if len(scenario.feedback) < args.feedback:
        raise ValueError(f"--feedback {args.feedback}: the scenario has only {len(scenario.feedback)} utterances")
    # The server's trainer reads it at start.
    os.environ["VOXLOOP_TRAINER_MIN_FEEDBACK"] = str(trainer_min_feedback(args.feedback))
    home = args.out / "server"
    shutil.rmtree(home, ignore_errors=True)  # a fresh registry and store: the shipped model, no feedback yet
    with ServerProcess(home, in_process_trainer=True) as server:
        version = server.wait_ready()
        config = BenchConfig(streams=(args.streams,), duration_s=args.duration_s, server=server.target,
                             server_pid=server.pid, audio=args.audio, token=user_token(0))
        pcm, rate = bench_audio(config)
        print(f"serving {version} at {server.target}; correcting {args.feedback} utterances", flush=True)
        correct_feedback(server, scenario.feedback[: args.feedback])
        cycle_start = log_time(wait_for_log(server, CYCLE_START_MARK, CYCLE_START_TIMEOUT_S))
        load_start = datetime.now()
        during = asyncio.run(run_streams(config, args.streams, pcm, rate))
        load_end = datetime.now()
        ended = wait_for_log(server, CYCLE_END_MARK, CYCLE_END_TIMEOUT_S)
        cycle_end = log_time(ended)
        idle = asyncio.run(run_streams(config, args.streams, pcm, rate))
    inside_s = max(0.0, (min(load_end, cycle_end) - max(load_start, cycle_start)).total_seconds())
    print(f"cycle: {(cycle_end - cycle_start).total_seconds():.1f} s, {ended.split(CYCLE_END_MARK)[1].strip()}; "
          f"{inside_s:.1f} s of the {(load_end - load_start).total_seconds():.1f} s load ran inside it", flush=True)
    print_report([("cycle running", during), ("idle", idle)])
    return 0 if during.failed == 0 and idle.failed == 0 else 1


def print_report(rows: list[tuple[str, RunSummary]]) -> None:
    print("\nFor docs/benchmarks.md:\n")
    print(f"`{shlex.join(['python', 'bench/streaming_during_cycle.py', *sys.argv[1:]])}`\n")
    print("| trainer " + TABLE_HEADER)
    print("|---" * (TABLE_HEADER.count("| ") + 1) + "|")
    for label, summary in rows:
        print(f"| {label} " + table_row(summary))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--feedback", type=int, default=64,
                        help="corrections sent (the trainer starts at 90%% of them)")
    parser.add_argument("--audio", type=Path, default=None, help="WAV/FLAC to stream (default: synthesized)")
    parser.add_argument("--scenario", type=Path, default=Path("runs/scenario"), help="scenario dir (built if missing)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-during-cycle"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except (RuntimeError, ValueError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
