"""One training cycle: feedback batch -> PPO(-ptx) update -> ONNX candidate -> gate -> publish -> record.

    report = run_cycle(store, registry, TrainerConfig(...))      # -> CycleReport

Stages (each logged with its figures):
 1. recover: a version published by a cycle that crashed after recording itself is activated now;
 2. read: up to `max_batch` pending items (per-user cap), mapped to rewards/targets (rewards.py);
 3. split: items with a reference text whose feedback-id hash falls in `heldout_share` are held out
    for the gate and never trained on. Held-out items ARE consumed by the cycle that gated on them:
    the store has no "held out" state, and leaving them pending would let them fill every later
    batch (pending_feedback returns the oldest first). Their ids are in the cycle's stats;
 4. update: rollout under the serving weights (= the frozen reference), then `ppo.epochs` passes; a
    two-pass (Whisper) policy then rehearses: supervised steps on texts of this cycle and earlier ones
    (the rehearsal memory: recently consumed items, never a held-out one; `ppo.rehearsal_steps`);
 5. export + parity: the candidate's ONNX graph, checked against its torch weights;
 6. gate (gate.py): held-out WER must not rise (this batch's held-out items and up to `heldout_pool`
    earlier ones: a batch's own few decide by a word), anchor WER may rise by at most
    `max_anchor_regression` per cycle and `max_total_anchor_regression` over the lineage's base
    version, parity must hold; all models scored with onnxruntime. A candidate refused by the anchor
    rules alone is rebuilt with its update halved and gated again, up to `gate_backoffs` times;
 7. publish (gate passed): a new immutable version `<stem>-c<NNNN>` (parent version, cycle stats,
    gate figures, feedback ids; the parent's decoder files carried forward, adapted with the
    corrections' words when `adapt_lexicon`), then
 8. record: `store.record_cycle` marks exactly the batch consumed in the transaction that records
    the cycle, then CURRENT is pointed at the new version. An intent file bridges 7 and 8: a crash
    after publishing but before recording leaves an unactivated version and the feedback pending
    (trained on again next cycle); a crash after recording but before activating is finished by
    stage 1 of the next cycle. A rejected candidate's batch is consumed too (outcome "gated"), or the
    same batch would be retried forever; the trainer's weights go back to the serving model's.

Exceptions other than a gate refusal (I/O, bugs, shutdown via UpdateAborted) propagate with nothing
recorded: the batch stays pending.

Data-parallel (`torchrun ... train --once`, trainer/distributed.py): the main process does stages 1-3
and 5-8 alone and hands the batch to the others; every process runs stage 4 on the same batch, each
computing its share of every step's minibatches. The others then return a "trained" report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from ..core import metrics
from ..core.model import MODEL_SAMPLE_RATE_HZ
from ..core.registry import MODEL_FILE, Registry, RegistryError
from ..core.store import FeedbackStore
from .base_data import BaseData, ensure_corpus
from .config import TrainerConfig
from .distributed import SINGLE, DataParallel
from .evaluate import EvalSummary
from .gate import GateConfig, GateDecision, GateInputs, VersionScores, evaluate_candidate
from .kinds import policy_kind
from .policies import ctc_vocabulary
from .rewards import FeedbackItem, feedback_item
from .state import TrainerState, clear_intent, read_intent, write_intent
from .update import StepStats, ppo_update
from .whisper_model import WhisperPolicy

log = logging.getLogger(__name__)

_CYCLE_SUFFIX = re.compile(r"-c\d+(\.\d+)?$")
HELDOUT_BUCKETS = 10_000


class CycleOutcome(StrEnum):
    """How a cycle ended: the `outcome` label of voxloop_trainer_cycles_total, the store's training_cycles.outcome
    and the alert rules (deploy/prometheus/alerts.yml)."""

    PUBLISHED = "published"
    """The gate passed: a new version is CURRENT."""
    GATED = "gated"
    """The gate refused the candidate; its batch is consumed, the weights go back to the serving version's."""
    SKIPPED = "skipped"
    """Nothing trainable in the batch (all held out or unusable); consumed."""
    IDLE = "idle"
    """No pending feedback; nothing recorded."""
    TRAINED = "trained"
    """A data-parallel process other than the main one did its share of the update; nothing recorded."""
    FAILED = "failed"
    """The cycle raised (I/O, a bug): nothing recorded, its batch stays pending; counted in the metric only
    (loop.py)."""


@dataclass
class CycleReport:
    """What a cycle did; `outcome` is published, gated, skipped (nothing trainable) or idle (no feedback); in a
    data-parallel process other than the main one, "trained" (its share of the update, nothing recorded)."""

    outcome: CycleOutcome
    cycle_id: int | None = None
    version_in: str | None = None
    version_out: str | None = None
    feedback_ids: list[int] = field(default_factory=list)
    """Every id the cycle consumed (trained, held out, unusable)."""
    trained_ids: list[int] = field(default_factory=list)
    heldout_ids: list[int] = field(default_factory=list)
    """This batch's held-out items (consumed, never trained on)."""
    earlier_heldout_ids: list[int] = field(default_factory=list)
    """Earlier cycles' held-out items the gate scored too (TrainerConfig.heldout_pool)."""
    unusable_ids: list[int] = field(default_factory=list)
    objective: str | None = None
    steps: int = 0
    rehearsed_ids: list[int] = field(default_factory=list)
    """Items of earlier cycles and this one a two-pass policy rehearsed after the update (PPOConfig.rehearsal_steps)."""
    reward_before: dict[str, float] = field(default_factory=dict)
    """Mean reward of the serving policy on the trained items: sampled paths and the greedy path."""
    reward_after: dict[str, float] = field(default_factory=dict)
    """The same for the candidate (fresh samples)."""
    last_step: StepStats | None = None
    """The update's last optimizer step (None without an update)."""
    gate: dict[str, Any] | None = None
    """The gate's decision on the last candidate built (after any backoffs)."""
    backoffs: int = 0
    """How many times the candidate was rebuilt with its update halved (TrainerConfig.gate_backoffs)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each stage ("read", "update", "export", "gate", and "backoffN.export"/".gate" for backoffs), of
    the update's parts ("update.rollout", "update.replay_pool", "update.steps", "update.rehearsal",
    "update.reward_after") and in total ("total")."""

    def as_dict(self) -> dict:
        return {**asdict(self), "last_step": self.last_step.as_dict() if self.last_step is not None else {}}


def is_heldout(feedback_id: int, share: float) -> bool:
    """Deterministic split by a hash of the id: the same item is held out in every run and process."""
    digest = hashlib.sha256(f"voxloop-heldout:{feedback_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_BUCKETS < share * HELDOUT_BUCKETS


def child_version_name(registry: Registry, parent: str, cycle_number: int) -> str:
    """`<parent stem>-c<NNNN>`, the stem without earlier cycle suffixes; `.N` appended if taken."""
    stem = _CYCLE_SUFFIX.sub("", parent)[:100]
    name = f"{stem}-c{cycle_number:04d}"
    taken = set(registry.versions())
    candidate, n = name, 1
    while candidate in taken or registry.version_dir(candidate).exists():
        candidate, n = f"{name}.{n}", n + 1
    return candidate


def recover_activation(store: FeedbackStore, registry: Registry, trainer_dir: Path) -> str | None:
    """Finish a cycle that crashed between record_cycle and activate (stage 1); returns what it activated."""
    version = read_intent(trainer_dir)
    if version is None:
        return None
    latest = store.latest_cycle()
    activated = None
    if latest is not None and latest.model_version_out == version and registry.current_version() != version:
        registry.activate(version)
        activated = version
        log.warning("recovered: cycle %d had published %s; CURRENT now points at it", latest.id, version)
    elif latest is None or latest.model_version_out != version:
        log.warning("version %s was published by a cycle that crashed before recording itself; it stays "
                    "unactivated and its feedback pending", version)
    clear_intent(trainer_dir)
    return activated


def lineage_base(registry: Registry, version: str) -> str:
    """The newest ancestor of `version` (itself included) that the online trainer did not make."""
    seen = set()
    while version not in seen:
        seen.add(version)
        card = registry.load_card(version)
        parent = card.get("parent_version")
        if (card.get("training") or {}).get("kind") != "online" or not parent:
            return version
        if not (registry.version_dir(parent) / MODEL_FILE).is_file():
            log.warning("lineage of %s: parent %s is gone; %s counts as the base", version, parent, version)
            return version
        version = parent
    return version


def _split(items: list[FeedbackItem], share: float) -> tuple[list[FeedbackItem], list[FeedbackItem]]:
    train, heldout = [], []
    for item in items:
        (heldout if item.reference and is_heldout(item.feedback_id, share) else train).append(item)
    return train, heldout


def _set_metrics(report: CycleReport, decision: GateDecision | None, parity: float | None) -> None:
    metrics.TRAINER_CYCLES.labels(report.outcome).inc()
    metrics.TRAINER_CYCLE_SECONDS.observe(report.seconds.get("total", 0.0))
    metrics.TRAINER_FEEDBACK_CONSUMED.inc(len(report.feedback_ids))
    metrics.TRAINER_LAST_CYCLE_TIMESTAMP.set(time.time())
    if report.last_step is not None:
        for name, value in report.last_step.gauges().items():
            metrics.TRAINER_PPO.labels(name).set(value)
    if decision is not None:
        for set_name, cand, serv in (("heldout", decision.heldout_wer_candidate, decision.heldout_wer_serving),
                                     ("anchor", decision.anchor_wer_candidate, decision.anchor_wer_serving)):
            if cand is not None:
                metrics.TRAINER_GATE_WER.labels(set_name, "candidate").set(cand)
                metrics.TRAINER_GATE_WER.labels(set_name, "serving").set(serv)
    if parity is not None:
        metrics.TRAINER_EXPORT_PARITY_ERROR.set(parity)


def _load_base_data(config: TrainerConfig, state: TrainerState, data_parallel: DataParallel) -> BaseData:
    """The anchor set and replay pool; the main process synthesizes a missing corpus before the others look."""
    if data_parallel.is_main:
        corpus = ensure_corpus(config.corpus_dir, config.trainer_dir, config.fallback_sentences)
    data_parallel.barrier()
    if not data_parallel.is_main:
        corpus = ensure_corpus(config.corpus_dir, config.trainer_dir, config.fallback_sentences)
    return BaseData(corpus, ctc_vocabulary(state.policy), config.anchor_size, config.replay_pool_size)


def _update(state: TrainerState, kind, train: list[FeedbackItem], memory: list[FeedbackItem], base_data: BaseData,
            config: TrainerConfig, should_stop, data_parallel: DataParallel, clock: _StageClock | None = None):
    """Stage 4 in every process: the same starting weights, the same rollout, a share of each step; then the
    rehearsal of `memory` and `train` (a two-pass policy's)."""
    clock = clock or _StageClock()
    data_parallel.broadcast_module(state.policy)
    generator = torch.Generator().manual_seed(config.ppo.seed + state.cycles)
    ppo_config = kind.ppo_config(config.ppo)
    rollout = kind.collect_rollout(train, ppo_config, generator)
    clock.part("rollout")
    replay = kind.replay(base_data) if ppo_config.replay_coef > 0 else None
    clock.part("replay_pool")
    update = ppo_update(state.policy, state.optimizer, state.kl_controller, rollout, ppo_config, replay=replay,
                        should_stop=should_stop, data_parallel=data_parallel,
                        minibatch_gradients=kind.minibatch_gradients)
    clock.part("steps")
    rehearsal = kind.rehearse(state.optimizer, [*memory, *train], replay, ppo_config,
                              random.Random(config.ppo.seed + state.cycles), should_stop, data_parallel)
    clock.part("rehearsal")
    return generator, rollout, update, rehearsal


def _update_share(state: TrainerState, train: list[FeedbackItem], memory: list[FeedbackItem],
                  base_data: BaseData | None, config: TrainerConfig, data_parallel: DataParallel,
                  registry_dir: Path) -> CycleReport:
    """A process other than the main one: its share of stage 4, then a "trained" report (nothing recorded)."""
    if not train:
        return CycleReport(CycleOutcome.IDLE, version_in=state.version)
    base_data = base_data or _load_base_data(config, state, data_parallel)
    kind = policy_kind(state.policy, registry_dir / state.version)
    _, _, update, _ = _update(state, kind, train, memory, base_data, config, lambda: False, data_parallel)
    return CycleReport(CycleOutcome.TRAINED, version_in=state.version, trained_ids=[i.feedback_id for i in train],
                       objective=config.ppo.objective, steps=update.steps, last_step=update.last)


class _StageClock:
    """Wall time of each stage (report.seconds): `lap(stage)` closes the stage that ran since the last lap;
    `part(name)` closes a part of the running stage (since its start or the last part), recorded as
    "<stage>.<name>" once the stage's lap names it."""

    def __init__(self) -> None:
        self.started = self._last = self._part = time.monotonic()
        self.seconds: dict[str, float] = {}
        self._parts: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.monotonic()
        self.seconds[stage], self._last = round(now - self._last, 3), now
        self.seconds.update({f"{stage}.{name}": seconds for name, seconds in self._parts.items()})
        self._part, self._parts = now, {}

    def part(self, name: str) -> None:
        now = time.monotonic()
        self._parts[name], self._part = round(now - self._part, 3), now

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.monotonic() - self.started, 3)}


def run_cycle(
    store: FeedbackStore,
    registry: Registry,
    config: TrainerConfig,
    *,
    state: TrainerState | None = None,
    base_data: BaseData | None = None,
    anchor_scores: VersionScores | None = None,
    should_stop=lambda: False,
    data_parallel: DataParallel = SINGLE,
) -> CycleReport:
    """Run one cycle on the pending feedback (see the module docstring); returns its report.

    `state`, `base_data` and `anchor_scores` let a long-running loop keep them between cycles; left
    out, they are loaded (checkpoint or CURRENT; corpus) for this call. Under data parallelism every
    process calls this at once (`should_stop` must then answer alike in all of them).
    """
    clock, started_at = _StageClock(), datetime.now(UTC)
    config.trainer_dir.mkdir(parents=True, exist_ok=True)
    main = data_parallel.is_main
    # 1. recover
    if main:
        recover_activation(store, registry, config.trainer_dir)
    data_parallel.barrier()  # every process loads the state after the recovery
    if state is None or state.version != registry.current_version():
        state = TrainerState.load(config.trainer_dir, registry, config.ppo)
    parent = state.version
    # 2. read (the main process; the others get the items to train on from it)
    pending, items, unusable = _read(store, config) if main else ([], [], [])
    # 3. split
    train, heldout = _split(items, config.heldout_share)
    pending_ids = [p.feedback.id for p in pending]
    memory = _rehearsal_memory(store, config, state, pending_ids) if main and train else []
    earlier_heldout = _heldout_pool(store, config, pending_ids) if main and train else []
    train, memory = data_parallel.broadcast((train, memory))
    if not main:
        return _update_share(state, train, memory, base_data, config, data_parallel, registry.versions_root)
    if not pending:
        return CycleReport(CycleOutcome.IDLE, version_in=parent)
    report = CycleReport(CycleOutcome.SKIPPED, version_in=parent, feedback_ids=pending_ids,
                         trained_ids=[i.feedback_id for i in train], heldout_ids=[i.feedback_id for i in heldout],
                         earlier_heldout_ids=[i.feedback_id for i in earlier_heldout],
                         unusable_ids=unusable, objective=config.ppo.objective)
    clock.lap("read")
    log.info("cycle on %s: %d items (%d train, %d held out, %d unusable; %d earlier held-out items gate too), "
             "objective %s", parent, len(pending), len(train), len(heldout), len(unusable), len(earlier_heldout),
             config.ppo.objective)
    if not train:
        return _record_unpublished(report, None, store, state, config, clock, started_at)
    # 4. update
    base_data = base_data or _load_base_data(config, state, data_parallel)
    snapshot = state.snapshot()
    kind = policy_kind(state.policy, registry.version_dir(parent))
    stats = _train(report, state, kind, train, memory, base_data, config, should_stop, data_parallel, clock)
    clock.lap("update")
    with tempfile.TemporaryDirectory(prefix="voxloop-cycle-", dir=config.trainer_dir) as tmp:
        latest = store.latest_cycle()
        cycle_number = (latest.id if latest else 0) + 1
        version = child_version_name(registry, parent, cycle_number)
        parent_dir, parent_card = registry.version_dir(parent), registry.load_card(parent)
        anchor_scores = anchor_scores or VersionScores()
        heldout_scores = VersionScores()  # the serving version on this cycle's held-out set, scored once
        for attempt in range(config.gate_backoffs + 1):
            if attempt:  # 6b. backoff: the update halved, then built and gated again
                log.info("candidate %s refused for the anchor alone; backoff %d: its update halved", version, attempt)
                stats.setdefault("refused_before_backoff", []).append(report.gate)
                state.step_back(snapshot)
                report.backoffs = attempt
            # 5. export + parity: the candidate as a complete version directory (with its adapted text side)
            candidate = kind.build_candidate(Path(tmp) / str(attempt) / version, version, parent_dir, parent_card,
                                             train, base_data.anchor, {"parent_version": parent}, config.adapt_lexicon)
            clock.lap("export" if not attempt else f"backoff{attempt}.export")
            # 6. gate
            decision, anchor_candidate = _gate(registry, parent, version, candidate, heldout + earlier_heldout,
                                               base_data, config, anchor_scores, heldout_scores)
            report.gate = stats["gate"] = decision.as_dict()
            clock.lap("gate" if not attempt else f"backoff{attempt}.gate")
            if decision.passed or not decision.anchor_only:
                break
        stats["backoffs"] = report.backoffs
        if not decision.passed:
            report.outcome = CycleOutcome.GATED
            return _record_unpublished(report, stats, store, state, config, clock, started_at, decision=decision,
                                       parity=candidate.parity_max_abs_diff, restore=snapshot)
        # 7. publish (not yet active)
        _publish(registry, version, candidate, cycle_number, len(train), stats, report.gate, config)
    # 8. record, then activate
    _record_and_activate(report, version, stats, store, registry, state, config, clock, started_at)
    if anchor_candidate is not None:
        anchor_scores.put(version, anchor_candidate)
    _set_metrics(report, decision, candidate.parity_max_abs_diff)
    log.info("cycle %d published %s (CURRENT); consumed %d feedback items in %.1f s", report.cycle_id, version,
             len(report.feedback_ids), report.seconds["total"])
    return report


def _rehearsal_memory(store: FeedbackStore, config: TrainerConfig, state: TrainerState,
                      pending_ids: list[int]) -> list[FeedbackItem]:
    """Stage 2b: earlier cycles' items with a text that this cycle may rehearse (a two-pass policy with a
    supervised objective): the most recently consumed, never an item the gate held out."""
    if not (isinstance(state.policy, WhisperPolicy) and config.ppo.rehearses and config.rehearsal_memory > 0):
        return []
    consumed = store.consumed_feedback(config.rehearsal_memory, exclude_ids=pending_ids,
                                       keep=lambda i: not is_heldout(i, config.heldout_share))
    return [item for item in _usable_items(consumed, config) if item.target]


def _heldout_pool(store: FeedbackStore, config: TrainerConfig, pending_ids: list[int]) -> list[FeedbackItem]:
    """Stage 3b: earlier cycles' held-out items with a reference, the gate's set beside this batch's own."""
    if config.heldout_pool == 0 or config.heldout_share == 0:
        return []
    consumed = store.consumed_feedback(config.heldout_pool, exclude_ids=pending_ids,
                                       keep=lambda i: is_heldout(i, config.heldout_share))
    return [item for item in _usable_items(consumed, config) if item.reference]


def _usable_items(consumed: list, config: TrainerConfig) -> list[FeedbackItem]:
    """Consumed feedback as FeedbackItems, leaving out what training could not use when it was read."""
    items = []
    for p in consumed:
        try:
            item = feedback_item(p)
        except ValueError:
            continue  # logged as unusable when it was read
        if len(item.samples) <= config.max_utterance_s * MODEL_SAMPLE_RATE_HZ:
            items.append(item)
    return items


def _read(store: FeedbackStore, config: TrainerConfig) -> tuple[list, list[FeedbackItem], list[int]]:
    """Stage 2: up to max_batch pending items as FeedbackItems; the ids of those training cannot use."""
    pending = store.pending_feedback(config.max_batch, max_share_per_user=config.max_share_per_user)
    items, unusable = [], []
    for p in pending:
        try:
            item = feedback_item(p)
        except ValueError as e:
            log.warning("feedback %d is not usable: %s", p.feedback.id, e)
            unusable.append(p.feedback.id)
            continue
        if len(item.samples) > config.max_utterance_s * MODEL_SAMPLE_RATE_HZ:
            unusable.append(item.feedback_id)
            continue
        items.append(item)
    return pending, items, unusable


def _train(report: CycleReport, state: TrainerState, kind, train: list[FeedbackItem], memory: list[FeedbackItem],
           base_data: BaseData, config: TrainerConfig, should_stop, data_parallel: DataParallel,
           clock: _StageClock) -> dict[str, Any]:
    """Stage 4 in the main process: the update and the trained items' reward before and after (into `report`);
    returns the cycle's stats for its record and card."""
    generator, rollout, update, rehearsal = _update(state, kind, train, memory, base_data, config, should_stop,
                                                    data_parallel, clock)
    report.reward_before = {"sampled": rollout.sampled_reward_mean, "greedy": rollout.greedy_reward_mean}
    report.steps, report.last_step = update.steps, update.last
    report.rehearsed_ids = rehearsal.feedback_ids if rehearsal else []
    sampled_after, greedy_after = kind.mean_rewards(train, kind.ppo_config(config.ppo), generator)
    report.reward_after = {"sampled": sampled_after, "greedy": greedy_after}
    clock.part("reward_after")
    log.info("cycle update (%s): %d steps; reward of the trained items (sampled / greedy) %.3f / %.3f -> "
             "%.3f / %.3f", kind.name, update.steps, rollout.sampled_reward_mean, rollout.greedy_reward_mean,
             sampled_after, greedy_after)
    return {"parent_version": report.version_in, "objective": config.ppo.objective, "policy_kind": kind.name,
            "trained_feedback_ids": report.trained_ids, "heldout_feedback_ids": report.heldout_ids,
            "earlier_heldout_feedback_ids": report.earlier_heldout_ids,
            "unusable_feedback_ids": report.unusable_ids, "steps": update.steps, "reward_before": report.reward_before,
            "reward_after": report.reward_after, "last_step": update.last.as_dict() if update.last else {},
            "rehearsal": rehearsal.as_dict() if rehearsal else None}


def _gate(registry: Registry, parent: str, version: str, candidate, heldout: list[FeedbackItem],
          base_data: BaseData, config: TrainerConfig,
          anchor_scores: VersionScores, heldout_scores: VersionScores) -> tuple[GateDecision, EvalSummary | None]:
    """Stage 6: the candidate against the serving version and the lineage's base (gate.py); logged."""
    base = lineage_base(registry, parent)
    inputs = GateInputs(candidate.directory, (parent, registry.version_dir(parent)), (base, registry.version_dir(base)),
                        [(i.samples, i.reference) for i in heldout],
                        [(u.float_samples(), u.text) for u in base_data.anchor])
    decision, anchor_candidate = evaluate_candidate(inputs, GateConfig.of(config), parity_ok=candidate.parity_ok,
                                                    parity_max_abs_diff=candidate.parity_max_abs_diff,
                                                    anchor_scores=anchor_scores, heldout_scores=heldout_scores)
    _log_gate(decision, version, base, candidate.parity_max_abs_diff)
    return decision, anchor_candidate


def _publish(registry: Registry, version: str, candidate, cycle_number: int, trained: int, stats: dict,
             gate: dict, config: TrainerConfig) -> None:
    """Stage 7: the candidate's directory as a new immutable version, not yet active, its card telling how it
    was made."""
    card = {**candidate.card,
            "description": f"online {config.ppo.objective} cycle {cycle_number} on {trained} feedback items",
            "training": {"kind": "online", "cycle_number": cycle_number, **stats,
                         "ppo_config": json.loads(json.dumps(asdict(config.ppo), default=str))},
            "gate": gate}
    files = {name: candidate.directory / name for name in candidate.card["files"]}
    registry.publish(version, files, {k: v for k, v in card.items() if k != "files"}, activate=False)


def _record_and_activate(report: CycleReport, version: str, stats: dict, store: FeedbackStore, registry: Registry,
                         state: TrainerState, config: TrainerConfig, clock: _StageClock, started_at: datetime) -> None:
    """Stage 8: the cycle recorded (its batch consumed), then CURRENT -> version; the intent file bridges a crash
    between the two (stage 1 of the next cycle finishes it)."""
    write_intent(config.trainer_dir, version)
    report.outcome, report.version_out = CycleOutcome.PUBLISHED, version
    report.seconds = clock.total()
    report.cycle_id = store.record_cycle(report.feedback_ids, report.outcome, version,
                                         {**stats, "seconds": report.seconds}, started_at=started_at)
    try:
        registry.activate(version)
    except RegistryError:
        log.exception("published %s but could not activate it; the next cycle retries", version)
        raise
    clear_intent(config.trainer_dir)
    state.version = version
    state.cycles += 1
    state.save(config.trainer_dir)


def _record_unpublished(report: CycleReport, stats: dict | None, store: FeedbackStore, state: TrainerState,
                        config: TrainerConfig, clock: _StageClock, started_at: datetime, *,
                        decision: GateDecision | None = None, parity: float | None = None,
                        restore: dict | None = None) -> CycleReport:
    """A cycle that publishes nothing (skipped: nothing trainable; gated): its batch consumed with its record, the
    trainer's weights back to `restore` (the serving version's), its metrics."""
    report.seconds = clock.total()
    recorded = {"report": report.as_dict()} if stats is None else {**stats, "seconds": report.seconds}
    report.cycle_id = store.record_cycle(report.feedback_ids, report.outcome, None, recorded, started_at=started_at)
    if restore is not None:
        state.restore(restore)
    state.cycles += 1
    state.save(config.trainer_dir)
    _set_metrics(report, decision, parity)
    return report


def _log_gate(decision: GateDecision, version: str, base: str, parity: float | None) -> None:
    log.info("gate %s for %s: held-out WER %s -> %s (%d utts), anchor WER %s -> %s (%d utts; base %s: %s), "
             "parity %s%s", "PASSED" if decision.passed else "REFUSED", version, decision.heldout_wer_serving,
             decision.heldout_wer_candidate, decision.heldout_utterances, decision.anchor_wer_serving,
             decision.anchor_wer_candidate, decision.anchor_utterances, base, decision.anchor_wer_base, parity,
             "" if decision.passed else ": " + "; ".join(decision.reasons))


__all__ = ["CycleOutcome", "CycleReport", "child_version_name", "is_heldout", "lineage_base", "recover_activation",
           "run_cycle"]
