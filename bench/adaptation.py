"""Adaptation bench: what feedback on a new domain does to domain WER, target words and the anchor.

    .venv/bin/python bench/adaptation.py [--arms ppo+sft,sft,ppo,reject:ppo,choice:ppo]
        [--points 0,16,32,64,128] [--scenario runs/scenario] [--corpus corpus] [--out runs/bench-adaptation]
        [--scenario-kind warehouse|voice]
    .venv/bin/python bench/adaptation.py --merge RUN1/results.json RUN2/results.json --out DIR

The scenario is trainer/scenario.py's (built into --scenario on first use): a warehouse domain of
product and place names no base transcript has, read by voices held out of base training; a feedback
stream (144 utterances), a held-out domain test (80) and an anchor (60 utterances of the base corpus's
own test split). `--scenario-kind voice` instead takes a held-out voice on words the model knows:
the base corpus's test sentences read by the held-out flite voice (feedback and test on different
sentences, the anchor on others still, in the training voices; no target words), where the n-best
often holds the fix.

Arms: OBJECTIVE, KIND:OBJECTIVE, either followed by `/noadapt` (text-side adaptation off). Each arm
gets a fresh data dir (registry seeded with the shipped model -- VOXLOOP_SHIPPED_MODEL_DIR picks it,
e.g. a built Whisper version or models/base -- and an empty store) and its own
`voxloop serve` subprocess on loopback, and is driven only through the public API and CLI:
1. measure: transcribe the domain test and the anchor (StreamingRecognize) and score the finals:
   domain WER, target-word accuracy, anchor WER;
2. feedback, in batches of 16: stream the next 16 feedback utterances and send, per arm kind,
   - `OBJECTIVE` (correction): SubmitCorrection with the reference text;
   - `reject:OBJECTIVE`: RejectTranscript for every transcript that is not exactly right (nothing else);
   - `choice:OBJECTIVE`: the final's n-best (max_alternatives 4); ChooseAlternative of the alternative
     closest to the reference (a user picking what they said), for every utterance with alternatives;
3. cycle: `voxloop train --once --objective OBJECTIVE` on the arm's data dir (the public training
   command; the server runs with --no-trainer so each batch is exactly one cycle), then wait until the
   server serves the published version (its registry watcher hot-swaps it); a gated cycle keeps it;
4. re-measure when the feedback sent so far is one of --points.

Reported per arm and point: domain WER, target-word accuracy, anchor WER, the cycles' outcomes;
per arm: seconds per cycle (the trainer's own `total`, and the `voxloop train` process wall clock
including its start), peak RSS of the trainer process and of the server. Writes results.json and
adaptation.png (matplotlib) to --out, and prints markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from voxloop.clients.client import RecognizerClient
from voxloop.clients.demo import (
    USERS,
    Scores,
    ServerProcess,
    run_train_once,
    score,
    transcribe_all,
    user_token,
    wait_for_version,
)
from voxloop.trainer.config import DEFAULT_CORPUS_DIR
from voxloop.trainer.corpus import load_manifest
from voxloop.trainer.cycle import CycleOutcome
from voxloop.trainer.evaluate import error_rates
from voxloop.trainer.scenario import Scenario, ScenarioConfig, build_scenario, load_scenario

OBJECTIVES = ("ppo", "sft", "ppo+sft")
KINDS = ("correct", "reject", "choice")
DEFAULT_ARMS = ("ppo+sft", "sft", "ppo", "reject:ppo", "choice:ppo")
DEFAULT_POINTS = (0, 16, 32, 64, 128)
BATCH = 16
"""Feedback items per training cycle (issue #5)."""
CHOICE_ALTERNATIVES = 4
SWAP_TIMEOUT_S = 120.0
WAREHOUSE_TITLE = "warehouse domain, held-out voices"
VOICE_SPLIT = "test_heldout_flite"
"""The voice scenario's speech: the base corpus's test sentences read by the flite voice held out of training."""
VOICE_ANCHOR_FROM = 400
"""The voice scenario's anchor: base `test` utterances from here on (other sentences than its feedback and test)."""


def voice_scenario(corpus: Path, feedback: int, test: int, anchor: int) -> Scenario:
    """A scenario of a new voice on words the model knows: base-corpus test sentences (their words are
    mostly in the lexicon, so the n-best often holds the fix) read by the held-out flite voice; feedback
    and test are other sentences; the anchor is the base `test` split (training voices) on others still."""
    voice = load_manifest(corpus / f"{VOICE_SPLIT}.jsonl")
    base = load_manifest(corpus / "test.jsonl")
    if len(voice) < feedback + test or len(base) < VOICE_ANCHOR_FROM + anchor or feedback + test > VOICE_ANCHOR_FROM:
        raise ValueError(f"{corpus} is too small for {feedback} feedback + {test} test + {anchor} anchor utterances")
    return Scenario(corpus, tuple(voice[:feedback]), tuple(voice[feedback : feedback + test]),
                    tuple(base[VOICE_ANCHOR_FROM : VOICE_ANCHOR_FROM + anchor]), frozenset())


NO_ADAPTATION = "/noadapt"
"""Arm suffix: the trainer runs without text-side adaptation (VOXLOOP_TRAINER_ADAPT_LEXICON=false: no lexicon/LM
re-estimation for a CTC version, no vocabulary prompt for a Whisper one)."""


@dataclass(frozen=True)
class Arm:
    kind: str
    """correct, reject or choice: the feedback users give."""
    objective: str
    adapt: bool = True
    """Text-side adaptation on (the default) or off."""

    @classmethod
    def parse(cls, text: str) -> Arm:
        adapt = not text.endswith(NO_ADAPTATION)
        kind, _, objective = text.removesuffix(NO_ADAPTATION).rpartition(":")
        kind = kind or "correct"
        if kind not in KINDS or objective not in OBJECTIVES:
            raise argparse.ArgumentTypeError(f"arm {text!r}: expected OBJECTIVE or KIND:OBJECTIVE with KIND in "
                                             f"{KINDS[1:]} and OBJECTIVE in {OBJECTIVES}, optionally "
                                             f"followed by {NO_ADAPTATION}")
        return cls(kind, objective, adapt)

    @property
    def name(self) -> str:
        name = self.objective if self.kind == "correct" else f"{self.kind}:{self.objective}"
        return name if self.adapt else name + NO_ADAPTATION

    @property
    def label(self) -> str:
        return {"correct": "corrections", "reject": "rejections only", "choice": "choices only"}[self.kind] + \
            f", {self.objective}" + ("" if self.adapt else ", no text-side adaptation")


@dataclass
class Point:
    feedback: int
    """Feedback items sent before this measurement."""
    version: str
    domain: Scores
    anchor: Scores


@dataclass
class ArmResult:
    arm: str
    points: list[Point] = field(default_factory=list)
    cycles: list[dict] = field(default_factory=list)
    """Per cycle: outcome, version_out, trainer seconds, process wall seconds, peak RSS (MiB), gate figures."""
    server_peak_rss_mib: float | None = None
    skipped_feedback: int = 0
    """Utterances of the stream that got no feedback (a rejection arm's exactly-right transcripts)."""


def measure(target: str, scenario, feedback: int) -> Point:
    domain = transcribe_all(target, [u.path for u in scenario.test])
    anchor = transcribe_all(target, [u.path for u in scenario.anchor])
    versions = {r.model_version for r in domain + anchor}
    return Point(feedback, ",".join(sorted(versions)),
                 score([u.text for u in scenario.test], [r.transcript for r in domain]),
                 score([u.text for u in scenario.anchor], [r.transcript for r in anchor]))


def send_feedback(client: RecognizerClient, arm: Arm, heard, utterance) -> bool:
    """Give the feedback the arm's users give on one final result; False when they give none."""
    if arm.kind == "correct":
        client.submit_correction(heard.utterance_id, utterance.text)
        return True
    if arm.kind == "reject":
        if heard.transcript == utterance.text:
            return False
        client.reject_transcript(heard.utterance_id)
        return True
    if len(heard.alternatives) < 2:
        return False
    wers = [error_rates([utterance.text], [a]).wer for a in heard.alternatives]
    client.choose_alternative(heard.utterance_id, wers.index(min(wers)))
    return True


def run_arm(arm: Arm, scenario, points: tuple[int, ...], home: Path, corpus: Path | None) -> ArmResult:
    result = ArmResult(arm.name)
    with ServerProcess(home, in_process_trainer=False) as server:
        server.wait_ready()
        result.points.append(measure(server.target, scenario, 0))
        _print_point(arm, result.points[-1])
        stream = list(enumerate(scenario.feedback))
        sent = 0
        clients = [RecognizerClient(server.target, token=user_token(u)) for u in range(USERS)]
        try:
            while sent < max(points):
                batch_sent = 0
                while batch_sent < BATCH:
                    if not stream:
                        raise RuntimeError(f"the feedback stream ran out at {sent} items; build a longer scenario")
                    chunk, stream = stream[: BATCH - batch_sent], stream[BATCH - batch_sent:]
                    for user in range(USERS):  # utterance k is user k % USERS's: they stream it and judge it
                        mine = [u for k, u in chunk if k % USERS == user]
                        heard = transcribe_all(server.target, [u.path for u in mine], token=user_token(user),
                                               max_alternatives=CHOICE_ALTERNATIVES if arm.kind == "choice" else 1)
                        for final, utterance in zip(heard, mine, strict=True):
                            if send_feedback(clients[user], arm, final, utterance):
                                batch_sent += 1
                            else:
                                result.skipped_feedback += 1
                sent += batch_sent
                run = run_train_once(home, objective=arm.objective, corpus_dir=corpus,
                                     env=None if arm.adapt else {"VOXLOOP_TRAINER_ADAPT_LEXICON": "false"})
                report = run.report
                if report.get("outcome") == CycleOutcome.PUBLISHED:
                    wait_for_version(server.target, report["version_out"], SWAP_TIMEOUT_S)
                result.cycles.append({
                    "feedback": sent, "outcome": report.get("outcome"), "version_out": report.get("version_out"),
                    "trainer_s": report.get("seconds", {}).get("total"), "process_s": round(run.wall_s, 1),
                    "peak_rss_mib": round(run.peak_rss_mib, 1), "gate": report.get("gate"),
                })
                print(f"  [{arm.name}] cycle at {sent} feedback: {report.get('outcome')} "
                      f"{report.get('version_out') or ''} ({run.wall_s:.0f} s, {run.peak_rss_mib:.0f} MiB)",
                      flush=True)
                if sent in points:
                    result.points.append(measure(server.target, scenario, sent))
                    _print_point(arm, result.points[-1])
        finally:
            for client in clients:
                client.close()
        result.server_peak_rss_mib = server.peak_rss_mib()
    return result


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _print_point(arm: Arm, point: Point) -> None:
    print(f"  [{arm.name}] {point.feedback:3d} feedback: domain WER {point.domain.wer:.1%}, target words "
          f"{_percent(point.domain.target_accuracy)}, anchor WER {point.anchor.wer:.1%} ({point.version})",
          flush=True)


# --- report --------------------------------------------------------------------------------------

def tables(results: list[ArmResult], points: tuple[int, ...]) -> list[str]:
    lines = ["| arm | " + " | ".join(f"{p} fb: domain WER / target acc / anchor WER" for p in points) + " |",
             "|---|" + "---|" * len(points)]
    for result in results:
        by_point = {p.feedback: p for p in result.points}
        cells = [f"{by_point[p].domain.wer:.1%} / {_percent(by_point[p].domain.target_accuracy)} / "
                 f"{by_point[p].anchor.wer:.1%}" if p in by_point else "-" for p in points]
        lines.append(f"| {result.arm} | " + " | ".join(cells) + " |")
    lines += ["", "| arm | domain WER change at the last point | anchor WER change | cycles published/gated | "
                  "s per cycle (trainer / process) | peak trainer RSS | peak server RSS |",
              "|---|---|---|---|---|---|---|"]
    for result in results:
        first, last = result.points[0], result.points[-1]
        relative = (last.domain.wer - first.domain.wer) / first.domain.wer if first.domain.wer else float("nan")
        published = sum(c["outcome"] == CycleOutcome.PUBLISHED for c in result.cycles)
        trainer_s = [c["trainer_s"] for c in result.cycles if c["trainer_s"] is not None]
        process_s = [c["process_s"] for c in result.cycles]
        rss = max((c["peak_rss_mib"] for c in result.cycles), default=float("nan"))
        lines.append(
            f"| {result.arm} | {relative:+.1%} relative ({first.domain.wer:.1%} -> {last.domain.wer:.1%}, "
            f"{last.feedback} fb) | {100 * (last.anchor.wer - first.anchor.wer):+.1f} points | "
            f"{published}/{len(result.cycles) - published} | "
            f"{_mean(trainer_s):.0f} / {_mean(process_s):.0f} | {rss:.0f} MiB | "
            f"{result.server_peak_rss_mib or float('nan'):.0f} MiB |")
    return lines


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def plot(results: list[ArmResult], path: Path, title: str = WAREHOUSE_TITLE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for result in results:
        xs = [p.feedback for p in result.points]
        axes[0].plot(xs, [100 * p.domain.wer for p in result.points], marker="o", label=result.arm)
        if all(p.domain.target_accuracy is not None for p in result.points):
            axes[1].plot(xs, [100 * p.domain.target_accuracy for p in result.points], marker="o", label=result.arm)
        axes[2].plot(xs, [100 * p.anchor.wer for p in result.points], marker="o", label=result.arm)
    for axis, panel in zip(axes, ("domain-test WER (%)", "target-word accuracy (%)", "anchor WER (%)"), strict=True):
        axis.set_title(panel)
        axis.set_xlabel("feedback items")
        axis.grid(alpha=0.3)
    if not axes[1].lines:
        axes[1].text(0.5, 0.5, "no target words in this scenario", ha="center", va="center",
                     transform=axes[1].transAxes)
    axes[0].legend()
    figure.suptitle(f"voxloop adaptation: {title} (bench/adaptation.py)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def load_results(path: Path) -> list[ArmResult]:
    """The arms a run wrote to results.json."""
    results = []
    for arm in json.loads(Path(path).read_text()):
        points = [Point(p["feedback"], p["version"], Scores(**p["domain"]), Scores(**p["anchor"]))
                  for p in arm.pop("points")]
        results.append(ArmResult(points=points, **arm))
    return results


def merge(paths: list[Path], out: Path) -> int:
    """Tables and one plot of the arms of several runs (e.g. arms run in separate processes)."""
    results = [result for path in paths for result in load_results(path)]
    points = tuple(sorted({p.feedback for result in results for p in result.points}))
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "adaptation.png")
    print("\n".join(tables(results, points)))
    print(f"\nplot: {out / 'adaptation.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help="comma-separated: OBJECTIVE (corrections) or reject:OBJECTIVE / choice:OBJECTIVE")
    parser.add_argument("--points", default=",".join(map(str, DEFAULT_POINTS)),
                        help="feedback counts to measure at (multiples of 16, 0 first)")
    parser.add_argument("--scenario", type=Path, default=Path("runs/scenario"), help="scenario dir (built if missing)")
    parser.add_argument("--scenario-kind", choices=("warehouse", "voice"), default="warehouse",
                        help="warehouse: new words (trainer/scenario.py); voice: a held-out voice on the base "
                             "corpus's own test sentences (needs --corpus)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS_DIR,
                        help="base corpus for the trainer's anchor and replay (missing: it synthesizes a small one)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-adaptation"))
    parser.add_argument("--feedback-utterances", type=int, default=ScenarioConfig.feedback_utterances)
    parser.add_argument("--test-utterances", type=int, default=ScenarioConfig.test_utterances)
    parser.add_argument("--anchor-utterances", type=int, default=ScenarioConfig.anchor_utterances)
    parser.add_argument("--scenario-seed", type=int, default=ScenarioConfig.seed,
                        help="warehouse: seeds its sentences and voices (another draw of the same scenario)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="RESULTS_JSON",
                        help="run nothing: print the tables of these results.json files and plot them into --out")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    arms = [Arm.parse(a.strip()) for a in args.arms.split(",") if a.strip()]
    points = tuple(sorted({int(p) for p in args.points.split(",")}))
    if points[0] != 0 or any(p % BATCH for p in points):
        parser.error(f"--points must start at 0 and be multiples of {BATCH}")
    logging.basicConfig(level=logging.WARNING)

    corpus = args.corpus if (args.corpus / "train.jsonl").is_file() else None
    if args.scenario_kind == "voice":
        if corpus is None:
            parser.error(f"--scenario-kind voice needs a built corpus at --corpus ({args.corpus})")
        scenario = voice_scenario(corpus, args.feedback_utterances, args.test_utterances, args.anchor_utterances)
        title = f"held-out voice ({VOICE_SPLIT}) on known words"
    else:
        scenario_config = ScenarioConfig(out_dir=args.scenario, seed=args.scenario_seed,
                                         feedback_utterances=args.feedback_utterances,
                                         test_utterances=args.test_utterances,
                                         anchor_utterances=args.anchor_utterances)
        scenario = load_scenario(build_scenario(scenario_config))
        title = WAREHOUSE_TITLE
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"scenario {scenario.directory}: {len(scenario.feedback)} feedback, {len(scenario.test)} test, "
          f"{len(scenario.anchor)} anchor utterances; corpus {corpus or '(trainer fallback)'}; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}", flush=True)
    results = []
    for arm in arms:
        home = args.out / "homes" / arm.name.replace(":", "-").replace("+", "-").replace("/", "-")
        shutil.rmtree(home, ignore_errors=True)
        started = time.monotonic()
        print(f"arm {arm.name} ({arm.label}), data dir {home}", flush=True)
        results.append(run_arm(arm, scenario, points, home, corpus.resolve() if corpus else None))
        print(f"arm {arm.name} done in {time.monotonic() - started:.0f} s", flush=True)
        (args.out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2, default=str))
        plot(results, args.out / "adaptation.png", title)
    print("\nFor docs/benchmarks.md:\n")
    print("\n".join(tables(results, points)))
    print(f"\nplot: {args.out / 'adaptation.png'}; results: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
