"""`voxloop demo`: the whole loop on this machine in a few minutes, through the public API only.

    voxloop demo [--home DIR] [--feedback 64] [--test 24] [--trainer inprocess|once] [--timeout-s 540]

1. builds the adaptation scenario (trainer/scenario.py: warehouse sentences full of product and
   place names the base model never heard, spoken by held-out voices) under the demo's home;
2. starts `voxloop serve` as a subprocess on a free loopback port with its own data dir (a temporary
   VOXLOOP_HOME unless --home is given) and the in-process trainer;
3. transcribes the held-out test utterances (WER "before"), then streams the feedback utterances and
   submits each one's correction, as a user of a deployment would;
4. waits for the trainer's cycle (feedback stats' `training_cycles`), shows whether the served model
   version changed (the gate may keep the old one, and then says why in its figures), and
5. re-transcribes the held-out utterances and prints a before/after table (WER, target-word accuracy).

With the in-process trainer a cycle starts once `min_feedback` corrections are pending; the demo sets
it to 90% of `--feedback` (default 64), since the store flags a correction that shares too little
with what was heard and keeps it out of training. `--trainer once` serves without the in-process trainer and
runs `voxloop train --once` after the corrections instead (what the tests use, with a small set).

The server and trainer helpers here (`ServerProcess`, `transcribe_all`, `score`, `run_train_once`)
are what bench/adaptation.py drives its arms with. Only `run_demo`'s `out` callback prints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .client import AsyncRecognizerClient, RecognizerClient, VoxloopError
from .client import Utterance as FinalResult

if TYPE_CHECKING:
    from voxloop.trainer.cycle import CycleOutcome

log = logging.getLogger(__name__)

SERVER_START_TIMEOUT_S = 180.0
"""First start seeds the registry and warms the model up; a loaded 2-core machine needs a while."""
SERVER_STOP_GRACE_S = 60.0
"""SIGTERM lets a running cycle finish its stage; past this the server is killed."""
TRANSCRIBE_CONCURRENCY = 4
"""Files streamed at once while measuring (unpaced)."""
VERSION_POLL_S = 0.5
DEMO_TIMEOUT_S = 540.0
"""The demo gives up waiting for the trainer after this long (the target is under 10 minutes in all)."""
RATE_LIMIT_LIFTED_PER_S = 1_000_000
"""feedback_rate_per_s and burst for the demo's and bench's server: one scripted user sends everything."""


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


USERS = 4
"""Users of the scripted deployment (one bearer token each). The trainer caps one user's share of a
batch (TrainerConfig.max_share_per_user, a poisoning guard), so one user alone could fill half a batch."""
TENANT = "warehouse"


def user_token(user: int) -> str:
    return f"demo-token-{user}"


def write_server_config(data_dir: Path, users: int = USERS) -> Path:
    """The TOML config the demo and the bench serve with: `users` bearer tokens, feedback rate lifted."""
    tokens = data_dir / "tokens.toml"
    tokens.write_text("".join(f'[[tokens]]\ntoken = "{user_token(i)}"\ntenant = "{TENANT}"\nuser = "user-{i}"\n\n'
                              for i in range(users)))
    path = data_dir / "server.toml"
    path.write_text(f"feedback_rate_per_s = {RATE_LIMIT_LIFTED_PER_S}.0\nfeedback_burst = {RATE_LIMIT_LIFTED_PER_S}\n"
                    f'metrics_port = 0\nanonymous = false\ntokens_file = "{tokens}"\n')
    return path


class ServerProcess:
    """`voxloop serve` in a subprocess on a free loopback port; ready once it answers GetModelInfo."""

    def __init__(self, data_dir: Path, *, in_process_trainer: bool, model_dir: Path | None = None,
                 cwd: Path | None = None, env: dict[str, str] | None = None):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = free_loopback_port()
        self.target = f"127.0.0.1:{port}"
        command = [sys.executable, "-m", "voxloop.clients.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--data-dir", str(self.data_dir), "--config", str(write_server_config(self.data_dir))]
        if model_dir is not None:
            command += ["--model-dir", str(model_dir)]
        if not in_process_trainer:
            command.append("--no-trainer")
        env = {**os.environ, "VOXLOOP_HOME": str(self.data_dir), **(env or {})}
        self.log_path = self.data_dir / "server.log"
        log.info("starting %s (log: %s)", shlex.join(command), self.log_path)
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> str:
        """Block until the server answers; returns the serving model version."""
        deadline = time.monotonic() + timeout_s
        with RecognizerClient(self.target, token=user_token(0), timeout=2.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited with status {self.process.returncode}: "
                                       f"{self.log_tail()}")
                try:
                    return client.get_model_info().version
                except VoxloopError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the server did not answer within {timeout_s:g} s: "
                                           f"{self.log_tail()}") from None
                    time.sleep(0.2)

    def peak_rss_mib(self) -> float | None:
        """The server process's peak resident memory so far (VmHWM), or None once it has exited."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: graceful shutdown; the trainer stops at a safe point
        try:
            self.process.wait(SERVER_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- transcription and scoring -------------------------------------------------------------------

def transcribe_all(target: str, paths: Sequence[Path], *, token: str = user_token(0), max_alternatives: int = 1,
                   concurrency: int = TRANSCRIBE_CONCURRENCY,
                   progress: Callable[[int], None] | None = None) -> list[FinalResult]:
    """Stream each file (unpaced, `concurrency` at a time); the first final result of each, in order."""
    async def run() -> list[FinalResult]:
        limit = asyncio.Semaphore(concurrency)
        async with AsyncRecognizerClient(target, token=token, timeout=60.0) as client:
            async def one(path: Path) -> FinalResult:
                async with limit:
                    result = await client.transcribe_file(path, interim_results=False,
                                                          max_alternatives=max_alternatives)
                if progress is not None:
                    progress(1)
                if not result.utterances:
                    raise RuntimeError(f"{path}: the server returned no final result")
                return result.utterances[0]

            return list(await asyncio.gather(*(one(p) for p in paths)))

    return asyncio.run(run())


@dataclass(frozen=True)
class Scores:
    """How a model did on a set of utterances."""

    utterances: int
    wer: float
    """Corpus-level word error rate (0.25 = 25%)."""
    target_accuracy: float | None
    """Share of the references' target words recognized in place; None where the set has none."""


def score(references: Sequence[str], hypotheses: Sequence[str]) -> Scores:
    from voxloop.trainer.evaluate import error_rates
    from voxloop.trainer.scenario import target_word_accuracy

    summary = error_rates(list(references), list(hypotheses))
    targets = target_word_accuracy(list(references), list(hypotheses))
    return Scores(summary.utterances, summary.wer, targets.accuracy if targets.total else None)


def trainer_min_feedback(corrections: int) -> int:
    """The trainer's min_feedback for a batch of `corrections`: flagged corrections (too unlike what was
    heard) are not trained on, so a cycle starts at 90% of the batch rather than waiting for all of it."""
    return max(1, int(0.9 * corrections))


def served_version(target: str) -> str:
    with RecognizerClient(target, token=user_token(0), timeout=10.0) as client:
        return client.get_model_info().version


def training_cycles(target: str) -> int:
    with RecognizerClient(target, token=user_token(0), timeout=10.0) as client:
        return client.feedback_stats().training_cycles


def wait_for_version(target: str, version: str, timeout_s: float) -> None:
    """Block until the server serves `version` (its registry watcher hot-swaps a newly activated one)."""
    deadline = time.monotonic() + timeout_s
    while (current := served_version(target)) != version:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server still serves {current} {timeout_s:g} s after {version} was activated")
        time.sleep(VERSION_POLL_S)


@dataclass(frozen=True)
class TrainRun:
    """One `voxloop train --once` process: its cycle report and what the process cost."""

    report: dict
    wall_s: float
    peak_rss_mib: float


def run_train_once(data_dir: Path, *, objective: str | None = None, corpus_dir: Path | None = None,
                   timeout_s: float = 1800.0, env: dict[str, str] | None = None) -> TrainRun:
    """Run one training cycle on what is pending, as `voxloop train --once --json` in a child process."""
    command = [sys.executable, "-m", "voxloop.clients.cli", "train", "--once", "--json", "--data-dir", str(data_dir)]
    if objective is not None:
        command += ["--objective", objective]
    if corpus_dir is not None:
        command += ["--corpus", str(corpus_dir)]
    log_path = data_dir / "train.log"
    started = time.monotonic()
    with log_path.open("ab") as log_file, tempfile.TemporaryFile() as stdout:
        process = subprocess.Popen(command, stdout=stdout, stderr=log_file, env={**os.environ, **(env or {})})
        deadline = started + timeout_s
        while True:
            # wait4, not wait: it also returns the child's resource usage (ru_maxrss: peak RSS in KiB).
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                os.wait4(process.pid, 0)
                raise RuntimeError(f"voxloop train --once ran past {timeout_s:g} s; see {log_path}")
            time.sleep(0.2)
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        output = stdout.read().decode(errors="replace")
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"voxloop train --once exited with {process.returncode}: {tail}")
    return TrainRun(json.loads(output), time.monotonic() - started, usage.ru_maxrss / 1024)


# --- the demo -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoConfig:
    """What `voxloop demo` runs."""

    home: Path | None = None
    """Data dir of the demo's server (registry, store, trainer state, scenario); None: a temporary one."""
    feedback: int = 64
    """Feedback utterances streamed and corrected (the in-process trainer cycles at 90% of them pending)."""
    test: int = 24
    """Held-out domain utterances transcribed before and after."""
    trainer: str = "inprocess"
    """inprocess: the server's own trainer cycles; once: `voxloop train --once` after the corrections."""
    timeout_s: float = DEMO_TIMEOUT_S
    """How long to wait for the cycle."""
    model_dir: Path | None = None
    """Registry to serve (None: the shipped base model, copied into the demo's registry)."""
    seed: int = 0
    """Scenario seed."""

    def __post_init__(self) -> None:
        if self.trainer not in ("inprocess", "once"):
            raise ValueError(f"trainer must be 'inprocess' or 'once', got {self.trainer!r}")
        if not 12 <= self.feedback <= 1000 or not 12 <= self.test <= 1000:
            raise ValueError("--feedback and --test must be 12..1000 (each needs every product and place name)")
        if self.timeout_s <= 0:
            raise ValueError("--timeout-s must be > 0")


@dataclass(frozen=True)
class DemoResult:
    version_before: str
    version_after: str
    cycle_outcome: CycleOutcome
    before: Scores
    after: Scores
    seconds: float


def _tqdm(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="utt", file=sys.stderr, leave=False)


def run_demo(config: DemoConfig, out: Callable[[str], None]) -> DemoResult:
    """Run the demo; `out` gets every line meant for the person watching."""
    with tempfile.TemporaryDirectory(prefix="voxloop-demo-") as tmp:
        home = Path(config.home) if config.home is not None else Path(tmp)
        return _run_demo(config, home, out)


def _run_demo(config: DemoConfig, home: Path, out: Callable[[str], None]) -> DemoResult:
    from voxloop.trainer.scenario import ScenarioConfig, build_scenario, load_scenario

    started = time.monotonic()
    out(f"voxloop demo: data in {home}")
    out(f"1/5 building the deployment scenario ({config.feedback} feedback + {config.test} held-out utterances)")
    scenario_config = ScenarioConfig(out_dir=home / "scenario", seed=config.seed, feedback_utterances=config.feedback,
                                     test_utterances=config.test, anchor_utterances=1)
    scenario = load_scenario(build_scenario(scenario_config))

    out("2/5 starting voxloop serve" + (" with the in-process trainer" if config.trainer == "inprocess" else ""))
    with ServerProcess(home / "server", in_process_trainer=config.trainer == "inprocess", model_dir=config.model_dir,
                       env={"VOXLOOP_TRAINER_MIN_FEEDBACK": str(trainer_min_feedback(config.feedback))}) as server:
        version_before = server.wait_ready()
        out(f"    serving {version_before} at {server.target}")

        test_refs = [u.text for u in scenario.test]
        with _tqdm(len(scenario.test), "transcribing held-out") as bar:
            before_results = transcribe_all(server.target, [u.path for u in scenario.test], progress=bar.update)
        before = score(test_refs, [r.transcript for r in before_results])
        out(f"3/5 held-out WER before: {before.wer:.1%}; e.g. heard {before_results[0].transcript!r} "
            f"for {test_refs[0]!r}")

        cycles_before = training_cycles(server.target)
        with _tqdm(len(scenario.feedback), "streaming + correcting") as bar:
            heard = []
            for user in range(USERS):  # each user streams their share and corrects what they said
                mine = scenario.feedback[user::USERS]
                results = transcribe_all(server.target, [u.path for u in mine], token=user_token(user),
                                         progress=bar.update)
                with RecognizerClient(server.target, token=user_token(user)) as client:
                    for result, utterance in zip(results, mine, strict=True):
                        client.submit_correction(result.utterance_id, utterance.text)
                heard += results
        out(f"4/5 submitted {len(heard)} corrections; waiting for a training cycle "
            f"({'in-process trainer' if config.trainer == 'inprocess' else 'voxloop train --once'})")
        outcome = _wait_for_cycle(config, server, cycles_before, version_before)
        version_after = served_version(server.target)
        out(f"    model version: {version_before} -> {version_after}"
            + ("" if version_after != version_before else f" (unchanged: cycle outcome {outcome})"))
        if version_after == version_before and (refusal := gate_refusal(server.data_dir)):
            out(f"    the gate refused the candidate: {refusal}")

        with _tqdm(len(scenario.test), "re-transcribing held-out") as bar:
            after_results = transcribe_all(server.target, [u.path for u in scenario.test], progress=bar.update)
        after = score(test_refs, [r.transcript for r in after_results])
    result = DemoResult(version_before, version_after, outcome, before, after, time.monotonic() - started)
    out("5/5 held-out domain utterances, before and after the corrections:")
    for line in result_table(result):
        out(line)
    out(f"done in {result.seconds:.0f} s")
    return result


def _wait_for_cycle(config: DemoConfig, server: ServerProcess, cycles_before: int,
                    version_before: str) -> CycleOutcome:
    """Wait until the server's store records a new cycle; returns its outcome (published/gated/...)."""
    from voxloop.trainer.cycle import CycleOutcome

    if config.trainer == "once":
        run = run_train_once(server.data_dir)
        report = run.report
        if report.get("version_out"):
            wait_for_version(server.target, report["version_out"], 60.0)
        return CycleOutcome(report["outcome"])
    deadline = time.monotonic() + config.timeout_s
    with _tqdm(0, "waiting for the trainer") as bar:
        bar.unit = "s"
        while training_cycles(server.target) <= cycles_before:
            if server.process.poll() is not None:
                raise RuntimeError(f"the server exited during the cycle: {server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no training cycle within {config.timeout_s:g} s; see {server.log_path}")
            time.sleep(1.0)
            bar.update(1)
    # A published cycle activates its version; the watcher swaps it in within a poll interval.
    time.sleep(4 * VERSION_POLL_S)
    # (the in-process trainer's report is not at hand: a cycle that changed nothing counts as gated)
    return CycleOutcome.PUBLISHED if served_version(server.target) != version_before else CycleOutcome.GATED


def gate_refusal(data_dir: Path) -> str | None:
    """Why the gate refused the last cycle's candidate (its reasons and held-out figures), read from the
    server's store; None when the last cycle was not refused by the gate."""
    from voxloop.core.data_dir import STORE_FILE
    from voxloop.core.store import FeedbackStore

    store = FeedbackStore.open(Path(data_dir) / STORE_FILE)
    try:
        cycle = store.latest_cycle()
    finally:
        store.close()
    gate = (cycle.stats or {}).get("gate") if cycle is not None else None
    if not gate or gate.get("passed", True):
        return None
    figures = ""
    if gate.get("heldout_utterances"):
        figures = (f" (held-out WER {gate['heldout_wer_serving']:.1%} -> {gate['heldout_wer_candidate']:.1%} "
                   f"on {gate['heldout_utterances']} utterances; anchor WER {gate['anchor_wer_serving']:.1%} -> "
                   f"{gate['anchor_wer_candidate']:.1%})")
    return "; ".join(gate.get("reasons", [])) + figures


def result_table(result: DemoResult) -> list[str]:
    def target(s: Scores) -> str:
        return "-" if s.target_accuracy is None else f"{s.target_accuracy:.1%}"

    return [
        "| model | version | held-out WER | target-word accuracy |",
        "|---|---|---|---|",
        f"| before | {result.version_before} | {result.before.wer:.1%} | {target(result.before)} |",
        f"| after | {result.version_after} | {result.after.wer:.1%} | {target(result.after)} |",
    ]


def add_subcommand(commands) -> None:
    """Register `voxloop demo` on the CLI's subparsers."""
    demo = commands.add_parser("demo", help="the learning loop end to end: serve, correct, train, hot-swap, "
                                            "before/after WER (a few minutes)")
    demo.add_argument("--home", type=Path, default=None, help="data dir to use and keep (default: a temporary one)")
    demo.add_argument("--feedback", type=int, default=DemoConfig.feedback, help="utterances to correct (default 64)")
    demo.add_argument("--test", type=int, default=DemoConfig.test, help="held-out utterances (default 24)")
    demo.add_argument("--trainer", choices=("inprocess", "once"), default=DemoConfig.trainer,
                      help="the server's in-process trainer (default) or one `voxloop train --once`")
    demo.add_argument("--timeout-s", type=float, default=DEMO_TIMEOUT_S, help="longest wait for the cycle")
    demo.add_argument("--model-dir", type=Path, default=None, help="registry to serve (default: the shipped model)")
    demo.set_defaults(handler=_demo_command)


def _demo_command(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="voxloop: %(levelname)s %(name)s: %(message)s")
    config = DemoConfig(home=args.home, feedback=args.feedback, test=args.test, trainer=args.trainer,
                        timeout_s=args.timeout_s, model_dir=args.model_dir)
    run_demo(config, lambda line: print(line, flush=True))
    return 0


__all__ = ["DemoConfig", "DemoResult", "Scores", "ServerProcess", "TrainRun", "add_subcommand", "result_table",
           "run_demo", "run_train_once", "score", "transcribe_all", "wait_for_version"]
