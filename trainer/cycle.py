"""One training cycle: feedback batch -> PPO(-ptx) update -> ONNX candidate -> gate -> publish -> record.

    report = run_cycle(store, registry, TrainerConfig(...))      # -> CycleReport

Stages (each logged with its figures):
 1. recover: a version published by a cycle that crashed after recording itself is activated now;
 2. read: up to `max_batch` pending items (per-user cap), mapped to rewards/targets (rewards.py);
 3. split: items with a reference text whose feedback-id hash falls in `heldout_share` are held out
    for the gate and never trained on. Held-out items ARE consumed by the cycle that gated on them:
    the store has no "held out" state, and leaving them pending would let them fill every later
    batch (pending_feedback returns the oldest first). Their ids are in the cycle's stats;
 4. update: rollout under the serving weights (= the frozen reference), then `ppo.epochs` passes;
 5. export + parity: the candidate's ONNX graph, checked against its torch weights;
 6. gate (gate.py): held-out WER must not rise, anchor WER may rise by at most
    `max_anchor_regression` per cycle and `max_total_anchor_regression` over the lineage's base
    version, parity must hold; all models scored with onnxruntime;
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
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import soundfile as sf
import torch

from ..server import metrics
from ..server.model import MODEL_SAMPLE_RATE_HZ
from ..server.registry import CARD_FILE, MODEL_FILE, Registry, RegistryError, sha256_file
from ..server.store import FeedbackKind, FeedbackStore
from ..server.warmup import PROBE_CARD_KEY, PROBE_FILE, probe_card_entry
from .base_data import BaseData, ensure_corpus
from .config import TrainerConfig
from .evaluate import EvalSummary
from .export import ParityError
from .gate import AnchorScores, GateDecision, decide, score_onnx
from .policies import check_policy_parity, export_policy, save_policy
from .release import POLICY_DIR
from .rewards import FeedbackItem, feedback_item
from .state import TrainerState, clear_intent, read_intent, write_intent
from .update import collect_rollout, mean_rewards, ppo_update

log = logging.getLogger(__name__)

_CYCLE_SUFFIX = re.compile(r"-c\d+(\.\d+)?$")
HELDOUT_BUCKETS = 10_000


@dataclass
class CycleReport:
    """What a cycle did; `outcome` is published, gated, skipped (nothing trainable) or idle (no feedback)."""

    outcome: str
    cycle_id: int | None = None
    version_in: str | None = None
    version_out: str | None = None
    feedback_ids: list[int] = field(default_factory=list)
    """Every id the cycle consumed (trained, held out, unusable)."""
    trained_ids: list[int] = field(default_factory=list)
    heldout_ids: list[int] = field(default_factory=list)
    unusable_ids: list[int] = field(default_factory=list)
    objective: str | None = None
    steps: int = 0
    reward_before: dict[str, float] = field(default_factory=dict)
    """Mean reward of the serving policy on the trained items: sampled paths and the greedy path."""
    reward_after: dict[str, float] = field(default_factory=dict)
    """The same for the candidate (fresh samples)."""
    last_step: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each stage and in total."""

    def as_dict(self) -> dict:
        return asdict(self)


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


def _decoder_files(parent_dir: Path, parent_card: dict, texts: list[str], out_dir: Path,
                   adapt: bool) -> tuple[dict[str, Path], dict | None]:
    """The child's decoder files and card section: adapted with `texts`, or the parent's carried forward."""
    carried = {name: parent_dir / name for name in parent_card.get("files", {})
               if name != MODEL_FILE and not name.startswith(POLICY_DIR + "/")}
    section = parent_card.get("decoder")
    if not section:
        return carried, None
    if adapt and texts:
        from .lm import adapt_decoder_files, decoder_card

        adapted = adapt_decoder_files(parent_dir, texts, out_dir)
        if adapted:
            card = decoder_card(parent_card) or {}
            card["adapted_sentences"] = len(texts)
            return {**carried, **adapted}, card
    return carried, section


def _decoder_dir(out_dir: Path, files: dict[str, Path], section: dict | None) -> Path | None:
    """A directory the evaluation's beam search can load the child's decoder from (None: greedy)."""
    if section is None:
        return None
    out_dir.mkdir(parents=True)
    for name, path in files.items():
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out_dir / name)
    # A card like a version's: the decoder loads only files its card lists (server/registry.py version_file).
    listed = {name: sha256_file(out_dir / name) for name in files}
    (out_dir / CARD_FILE).write_text(json.dumps({"decoder": section, "files": listed}))
    return out_dir


def _set_metrics(report: CycleReport, decision: GateDecision | None, parity: float | None) -> None:
    metrics.TRAINER_CYCLES.labels(report.outcome).inc()
    metrics.TRAINER_CYCLE_SECONDS.observe(report.seconds.get("total", 0.0))
    metrics.TRAINER_FEEDBACK_CONSUMED.inc(len(report.feedback_ids))
    metrics.TRAINER_LAST_CYCLE_TIMESTAMP.set(time.time())
    for name in ("reward_mean", "reward_std", "approx_kl", "clip_fraction", "entropy", "kl_coef", "policy_loss",
                 "ptx_loss", "kl", "grad_norm"):
        if name in report.last_step:
            metrics.TRAINER_PPO.labels(name).set(report.last_step[name])
    if decision is not None:
        for set_name, cand, serv in (("heldout", decision.heldout_wer_candidate, decision.heldout_wer_serving),
                                     ("anchor", decision.anchor_wer_candidate, decision.anchor_wer_serving)):
            if cand is not None:
                metrics.TRAINER_GATE_WER.labels(set_name, "candidate").set(cand)
                metrics.TRAINER_GATE_WER.labels(set_name, "serving").set(serv)
    if parity is not None:
        metrics.TRAINER_EXPORT_PARITY_ERROR.set(parity)


def run_cycle(
    store: FeedbackStore,
    registry: Registry,
    config: TrainerConfig,
    *,
    state: TrainerState | None = None,
    base_data: BaseData | None = None,
    anchor_scores: AnchorScores | None = None,
    should_stop=lambda: False,
) -> CycleReport:
    """Run one cycle on the pending feedback (see the module docstring); returns its report.

    `state`, `base_data` and `anchor_scores` let a long-running loop keep them between cycles; left
    out, they are loaded (checkpoint or CURRENT; corpus) for this call.
    """
    started, started_at = time.monotonic(), datetime.now(UTC)
    seconds: dict[str, float] = {}

    def lap(stage: str, since: float) -> float:
        now = time.monotonic()
        seconds[stage] = round(now - since, 3)
        return now

    trainer_dir = config.trainer_dir
    trainer_dir.mkdir(parents=True, exist_ok=True)
    # 1. recover
    recover_activation(store, registry, trainer_dir)
    if state is None or state.version != registry.current_version():
        state = TrainerState.load(trainer_dir, registry, config.ppo)
    parent = state.version
    # 2. read
    pending = store.pending_feedback(config.max_batch, max_share_per_user=config.max_share_per_user)
    if not pending:
        return CycleReport("idle", version_in=parent)
    items, unusable = [], []
    for p in pending:
        try:
            item = feedback_item(p)
        except ValueError as e:
            log.warning("feedback %d is not usable: %s", p.feedback.id, e)
            unusable.append(p.feedback.id)
            continue
        if len(item.samples) > config.max_utterance_s * 16_000:
            unusable.append(item.feedback_id)
            continue
        items.append(item)
    # 3. split
    train, heldout = _split(items, config.heldout_share)
    report = CycleReport("skipped", version_in=parent, feedback_ids=[p.feedback.id for p in pending],
                         trained_ids=[i.feedback_id for i in train], heldout_ids=[i.feedback_id for i in heldout],
                         unusable_ids=unusable, objective=config.ppo.objective)
    t = lap("read", started)
    log.info("cycle on %s: %d items (%d train, %d held out, %d unusable), objective %s", parent, len(pending),
             len(train), len(heldout), len(unusable), config.ppo.objective)
    if not train:
        report.cycle_id = store.record_cycle(report.feedback_ids, "skipped", None,
                                             {"report": report.as_dict()}, started_at=started_at)
        state.cycles += 1
        state.save(trainer_dir)
        report.seconds = {**seconds, "total": round(time.monotonic() - started, 3)}
        _set_metrics(report, None, None)
        return report

    # 4. update
    if base_data is None:
        corpus = ensure_corpus(config.corpus_dir, trainer_dir, config.fallback_sentences)
        base_data = BaseData(corpus, state.policy.config.vocabulary, config.anchor_size, config.replay_pool_size)
    generator = torch.Generator().manual_seed(config.ppo.seed + state.cycles)
    snapshot = state.snapshot()
    rollout = collect_rollout(state.policy, train, config.ppo, generator)
    report.reward_before = {"sampled": rollout.sampled_reward_mean, "greedy": rollout.greedy_reward_mean}
    replay = base_data.replay if config.ppo.replay_coef > 0 else None
    update = ppo_update(state.policy, state.optimizer, state.kl_controller, rollout, config.ppo, replay=replay,
                        should_stop=should_stop)
    report.steps, report.last_step = update.steps, update.last
    sampled_after, greedy_after = mean_rewards(state.policy, train, config.ppo, generator)
    report.reward_after = {"sampled": sampled_after, "greedy": greedy_after}
    t = lap("update", t)
    log.info("cycle update: %d steps; reward of the trained items (sampled / greedy) %.3f / %.3f -> %.3f / %.3f",
             update.steps, rollout.sampled_reward_mean, rollout.greedy_reward_mean, sampled_after, greedy_after)

    with tempfile.TemporaryDirectory(prefix="voxloop-cycle-", dir=trainer_dir) as tmp:
        staging = Path(tmp)
        cycle_number = (store.latest_cycle().id if store.latest_cycle() else 0) + 1
        version = child_version_name(registry, parent, cycle_number)
        # 5. export + parity
        onnx_path = export_policy(state.policy, staging / MODEL_FILE, version)
        parity_ok, parity_diff, parity_dict = True, None, None
        try:
            parity = check_policy_parity(state.policy, onnx_path)
            parity_diff, parity_dict = parity.max_abs_logprob_diff, parity.as_dict()
        except ParityError as e:
            log.error("candidate %s: %s", version, e)
            parity_ok = False
        t = lap("export", t)
        # The child's decoder (the parent's, adapted with the corrections' words): the gate decodes with it.
        parent_dir, parent_card = registry.version_dir(parent), registry.load_card(parent)
        texts = [i.target for i in train if i.kind in (FeedbackKind.CORRECTION, FeedbackKind.CHOICE) and i.target]
        decoder_files, decoder_section = _decoder_files(parent_dir, parent_card, texts, staging / "decoder",
                                                        config.adapt_lexicon)
        candidate_decoder = _decoder_dir(staging / "decoder-eval", decoder_files, decoder_section)
        # 6. gate
        serving_onnx = parent_dir / MODEL_FILE
        serving_decoder = parent_dir if parent_card.get("decoder") else None
        heldout_pairs = [(i.samples, i.reference) for i in heldout]
        anchor_pairs = [(u.float_samples(), u.text) for u in base_data.anchor]
        heldout_cand = score_onnx(onnx_path, heldout_pairs, candidate_decoder) if heldout_pairs else None
        heldout_serv = score_onnx(serving_onnx, heldout_pairs, serving_decoder) if heldout_pairs else None
        anchor_cand: EvalSummary | None = (score_onnx(onnx_path, anchor_pairs, candidate_decoder)
                                           if anchor_pairs else None)
        anchor_scores = anchor_scores or AnchorScores()
        anchor_serv = anchor_scores.get(parent, serving_onnx, anchor_pairs, serving_decoder) if anchor_pairs else None
        base = lineage_base(registry, parent)
        base_dir = registry.version_dir(base)
        base_decoder = base_dir if registry.load_card(base).get("decoder") else None
        anchor_base = (anchor_scores.get(base, base_dir / MODEL_FILE, anchor_pairs, base_decoder)
                       if anchor_pairs else None)
        decision = decide(heldout_candidate=heldout_cand, heldout_serving=heldout_serv,
                          anchor_candidate=anchor_cand, anchor_serving=anchor_serv,
                          max_anchor_regression=config.max_anchor_regression,
                          parity_max_abs_diff=parity_diff, parity_ok=parity_ok, anchor_base=anchor_base,
                          max_total_anchor_regression=config.max_total_anchor_regression,
                          decoding="lexicon-lm" if candidate_decoder is not None else "greedy",
                          min_heldout_utterances=config.min_heldout_utterances)
        report.gate = decision.as_dict()
        t = lap("gate", t)
        log.info("gate %s for %s: held-out WER %s -> %s (%d utts), anchor WER %s -> %s (%d utts; base %s: %s), "
                 "parity %s%s", "PASSED" if decision.passed else "REFUSED", version, decision.heldout_wer_serving,
                 decision.heldout_wer_candidate, decision.heldout_utterances, decision.anchor_wer_serving,
                 decision.anchor_wer_candidate, decision.anchor_utterances, base, decision.anchor_wer_base,
                 parity_diff,
                 "" if decision.passed else ": " + "; ".join(decision.reasons))
        stats_base = {"parent_version": parent, "objective": config.ppo.objective,
                      "trained_feedback_ids": report.trained_ids, "heldout_feedback_ids": report.heldout_ids,
                      "unusable_feedback_ids": unusable, "steps": update.steps, "reward_before": report.reward_before,
                      "reward_after": report.reward_after, "last_step": update.last, "gate": report.gate}
        if not decision.passed:
            report.outcome = "gated"
            report.seconds = {**seconds, "total": round(time.monotonic() - started, 3)}
            report.cycle_id = store.record_cycle(report.feedback_ids, "gated", None,
                                                 {**stats_base, "seconds": report.seconds}, started_at=started_at)
            state.restore(snapshot)
            state.cycles += 1
            state.save(trainer_dir)
            _set_metrics(report, decision, parity_diff)
            return report
        # 7. publish (not yet active)
        save_policy(state.policy, staging / POLICY_DIR)
        files = {MODEL_FILE: onnx_path}
        files.update({str(p.relative_to(staging)): p for p in sorted((staging / POLICY_DIR).rglob("*")) if p.is_file()})
        files.update(decoder_files)
        card = {
            "parent_version": parent,
            "format": parent_card.get("format", "streaming-ctc/1"),
            "model": {**parent_card.get("model", {}), "parameters": sum(p.numel() for p in state.policy.parameters())},
            "parity": parity_dict,
            "description": f"online {config.ppo.objective} cycle {cycle_number} on {len(train)} feedback items",
            "training": {"kind": "online", "cycle_number": cycle_number, **stats_base,
                         "ppo_config": json.loads(json.dumps(asdict(config.ppo), default=str))},
            "gate": report.gate,
        }
        if decoder_section is not None:
            card["decoder"] = decoder_section
        if base_data.anchor:  # the server's warm-up must reproduce this transcript (catches a wrong graph)
            probe_wav = staging / PROBE_FILE
            anchor = base_data.anchor[0]
            sf.write(probe_wav, anchor.samples, MODEL_SAMPLE_RATE_HZ, subtype="PCM_16")  # int16 16 kHz
            files[PROBE_FILE] = probe_wav
            card[PROBE_CARD_KEY] = probe_card_entry(onnx_path, probe_wav)
        registry.publish(version, files, card, activate=False)
    # 8. record, then activate
    write_intent(trainer_dir, version)
    report.outcome, report.version_out = "published", version
    report.seconds = {**seconds, "total": round(time.monotonic() - started, 3)}
    report.cycle_id = store.record_cycle(report.feedback_ids, "published", version,
                                         {**stats_base, "seconds": report.seconds}, started_at=started_at)
    try:
        registry.activate(version)
    except RegistryError:
        log.exception("published %s but could not activate it; the next cycle retries", version)
        raise
    clear_intent(trainer_dir)
    state.version = version
    state.cycles += 1
    state.save(trainer_dir)
    if anchor_cand is not None:
        anchor_scores.put(version, anchor_cand, lm=candidate_decoder is not None)
    _set_metrics(report, decision, parity_diff)
    log.info("cycle %d published %s (CURRENT); consumed %d feedback items in %.1f s", report.cycle_id, version,
             len(report.feedback_ids), report.seconds["total"])
    return report


__all__ = ["CycleReport", "child_version_name", "is_heldout", "lineage_base", "recover_activation", "run_cycle"]
