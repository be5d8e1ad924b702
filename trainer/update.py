"""One cycle's policy update: rollout of candidate CTC paths, then PPO(-ptx) epochs over minibatches.

    rollout = collect_rollout(policy, items, ppo_config, generator)     # pi_old == pi_ref here
    report = ppo_update(policy, optimizer, kl_controller, rollout, replay, ppo_config)

Stages of `ppo_update` per minibatch (numbered in the code; stage 4 once per step, after its minibatches):
 1. forward the minibatch's feedback audio through pi_theta (eval mode: no dropout, no SpecAugment,
    so the ratio pi_theta / pi_old is exactly 1 before the first step);
 2. PPO terms (objective ppo, ppo+sft): clipped surrogate over the candidates' per-frame log-probs,
    exact per-frame KL to the reference with the adaptive coefficient, entropy bonus;
 3. supervised terms: CTC on the feedback targets (objective sft, ppo+sft) and CTC on replayed base
    data (replay_coef > 0, every objective) -- InstructGPT's ptx;
 4. one AdamW step with global gradient clipping on the step's minibatches' summed gradients (summed across
    processes too under torchrun); the KL controller sees the step's exact KL.

The cycle starts from the serving version's weights, and that version is the frozen reference: the
rollout's per-frame distributions are the reference's, so no second model is kept in memory.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import numpy as np
import torch

from ..core.decoder import path_text
from .config import PPOConfig
from .data import IGNORE_INDEX
from .distributed import SINGLE, DataParallel
from .model import ctc_loss
from .policies import Policy
from .ppo import (
    AdaptiveKLController,
    best_alignment,
    clipped_policy_loss,
    entropy,
    greedy_paths,
    group_advantages,
    kl_to_reference,
    masked_mean,
    path_log_probs,
    sample_paths,
)
from .rewards import FeedbackItem
from .tokenizer import encode_targets, make_tokenizer

log = logging.getLogger(__name__)


class UpdateAborted(RuntimeError):
    """The caller asked the update to stop (shutdown); nothing it did should be kept."""


@dataclass
class ItemRollout:
    """Everything the update needs about one feedback item, computed once under pi_old."""

    item: FeedbackItem
    frames: int
    """Encoder frames of the item's audio (T)."""
    ref_log_probs: torch.Tensor
    """(T, V) per-frame log-probs of pi_old = pi_ref."""
    target_ids: list[int] | None
    """Tokenized supervised target, None without one (or when it has characters outside the vocabulary)."""
    paths: torch.Tensor
    """(K', T) candidate paths: K samples, then the greedy path, then target/alternative alignments."""
    old_log_probs: torch.Tensor
    """(K', T) per-frame log-probs of the candidates under pi_old."""
    rewards: torch.Tensor
    """(K',) reward of each candidate's text."""
    advantages: torch.Tensor
    """(K',) reward minus the group mean (over the item's candidates)."""
    sampled: int
    """How many of the candidates are samples (the first `sampled`)."""


@dataclass
class Rollout:
    items: list[ItemRollout]
    reward_mean: float
    """Mean reward over every candidate of every item."""
    reward_std: float
    sampled_reward_mean: float
    """Mean reward of the sampled candidates only: the policy's expected reward."""
    greedy_reward_mean: float


@dataclass(frozen=True, kw_only=True)
class StepStats:
    """One optimizer step's statistics (cleanrl's and TRL's names): each step's log line, and the last step's in
    the cycle's report and card (`last_step`) and in voxloop_trainer_ppo{statistic} (`gauges`).

    The fields from `kl` to `head_ctc_loss` are means over the step's minibatches that reported them (a policy
    kind's MinibatchGradients returns them by these names); None when none did (no PPO terms under objective
    sft, no replay without replay_coef, no first-pass head but a two-pass policy's)."""

    epoch: int
    """Pass over the rollout, from 0."""
    kl: float | None = None
    """Exact KL to the frozen reference policy, mean per frame (per token for a two-pass policy), nats."""
    entropy: float | None = None
    """Mean per-frame (per-token) entropy of the policy, nats."""
    ptx_loss: float | None = None
    """The supervised terms, weighted: sft_coef x sft_loss + replay_coef x replay_loss (+ head_ctc_coef x
    head_ctc_loss)."""
    loss: float | None = None
    """What the step descended: the PPO terms (clipped surrogate, KL penalty, entropy bonus) plus ptx_loss."""
    policy_loss: float | None = None
    """The clipped surrogate (PPO's policy-gradient loss)."""
    clip_fraction: float | None = None
    """Share of the candidates' frames (tokens) whose probability ratio the clip held."""
    approx_kl: float | None = None
    """pi_old vs pi_theta on the candidates' frames (the k3 estimator): how far the step moved the policy."""
    sft_loss: float | None = None
    """CTC (cross-entropy for a two-pass decoder) on the feedback targets."""
    replay_loss: float | None = None
    """The same on replayed base-corpus utterances (PPO-ptx)."""
    head_ctc_loss: float | None = None
    """CTC of a two-pass policy's first-pass head on the feedback targets."""
    step: int
    """Optimizer steps before this one in the update, from 0."""
    reward_mean: float
    """Mean reward over every candidate of the rollout (the same for every step of an update)."""
    reward_std: float
    kl_coef: float
    """The adaptive KL coefficient this step used."""
    grad_norm: float
    """Global gradient norm before clipping."""

    GAUGED: ClassVar[tuple[str, ...]] = ("reward_mean", "reward_std", "approx_kl", "clip_fraction", "entropy",
                                         "kl_coef", "policy_loss", "ptx_loss", "kl", "grad_norm")
    """What voxloop_trainer_ppo{statistic} exports (core/metrics.py documents the label values)."""

    @classmethod
    def minibatch_statistics(cls) -> tuple[str, ...]:
        """The fields a step averages over its minibatches' figures."""
        return tuple(f.name for f in fields(cls) if f.default is None)

    def as_dict(self) -> dict[str, float]:
        """The statistics a step has (None left out): the card's and the report's form."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    def gauges(self) -> dict[str, float]:
        """The GAUGED statistics this step has."""
        return {name: value for name in self.GAUGED if (value := getattr(self, name)) is not None}


@dataclass
class UpdateReport:
    steps: int = 0
    history: list[StepStats] = field(default_factory=list)
    """Every step's statistics, in order."""

    @property
    def last(self) -> StepStats | None:
        return self.history[-1] if self.history else None

    def as_dict(self) -> dict:
        return {"steps": self.steps, "history": [stats.as_dict() for stats in self.history]}


def _batch_audio(samples: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad float32 waveforms to (B, S); lengths (B,) in samples."""
    lengths = torch.tensor([len(s) for s in samples])
    audio = torch.zeros(len(samples), int(lengths.max()))
    for i, s in enumerate(samples):
        audio[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.float32))
    return audio, lengths


def forward_log_probs(
    policy: Policy, samples: Sequence[np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded batch forward: logits (B, T, V), log-probs (B, T, V), frame lengths (B,)."""
    audio, lengths = _batch_audio(samples)
    logits = policy(audio, input_lengths=lengths).logits
    return logits, torch.log_softmax(logits.float(), -1), policy.frames_for(lengths)


def _labels(target_ids: Sequence[list[int]]) -> torch.Tensor:
    labels = torch.full((len(target_ids), max(len(t) for t in target_ids)), IGNORE_INDEX, dtype=torch.long)
    for i, ids in enumerate(target_ids):
        labels[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return labels


@torch.no_grad()
def collect_rollout(
    policy: Policy,
    items: Sequence[FeedbackItem],
    config: PPOConfig,
    generator: torch.Generator,
    *,
    batch_size: int = 32,
) -> Rollout:
    """Candidates, rewards and group advantages of every item under the current policy (pi_old).

    Items whose audio is shorter than one encoder frame are left out.
    """
    policy.eval()
    vocabulary = policy.config.vocabulary
    tokenizer = make_tokenizer(vocabulary)
    out: list[ItemRollout] = []
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        _, log_probs, frame_lengths = forward_log_probs(policy, [it.samples for it in chunk])
        sampled = sample_paths(log_probs, config.samples_per_utterance, generator, config.sampling_temperature)
        for i, item in enumerate(chunk):
            frames = int(frame_lengths[i])
            if frames == 0:
                log.warning("feedback %d: audio shorter than one frame; not trained on", item.feedback_id)
                continue
            lp = log_probs[i, :frames]  # (T, V)
            target_ids = None
            if item.target:
                try:
                    target_ids = encode_targets(tokenizer, item.target)
                except ValueError as e:
                    log.warning("feedback %d: target not usable (%s)", item.feedback_id, e)
            paths = [p[:frames] for p in sampled[i]]
            if config.include_greedy:
                paths.append(greedy_paths(lp))
            aligned_texts = []
            if config.include_target_alignment and target_ids:
                aligned_texts.append(target_ids)
            for alternative in item.alternatives:  # a choice's n-best, a rejection's shown text (rewards.py)
                if alternative and alternative != item.target:
                    try:
                        aligned_texts.append(encode_targets(tokenizer, alternative))
                    except ValueError:
                        continue
            for ids in aligned_texts:
                alignment = best_alignment(lp, ids)
                if alignment is not None:
                    paths.append(alignment)
            stacked = torch.stack(paths)  # (K', T)
            rewards = torch.tensor([item.reward(path_text(p, vocabulary), config.reward_unit) for p in stacked])
            advantages = group_advantages(rewards[None], torch.ones(1, len(rewards), dtype=torch.bool),
                                          config.normalize_advantages)[0]
            old = path_log_probs(lp[None], stacked[None])[0]
            out.append(ItemRollout(item, frames, lp.clone(), target_ids, stacked, old, rewards, advantages,
                                   config.samples_per_utterance))
    all_rewards = torch.cat([r.rewards for r in out]) if out else torch.zeros(0)
    sampled_rewards = torch.cat([r.rewards[: r.sampled] for r in out]) if out else torch.zeros(0)
    greedy = [float(r.rewards[r.sampled]) for r in out if config.include_greedy]

    def mean(t: torch.Tensor | list[float]) -> float:
        return float(torch.as_tensor(t, dtype=torch.float).mean()) if len(t) else math.nan

    std = float(all_rewards.std(unbiased=False)) if len(all_rewards) else math.nan
    return Rollout(out, mean(all_rewards), std, mean(sampled_rewards), mean(greedy))


@torch.no_grad()
def mean_rewards(policy: Policy, items: Sequence[FeedbackItem], config: PPOConfig,
                 generator: torch.Generator) -> tuple[float, float]:
    """(sampled, greedy) mean reward of the policy on `items`: the before/after figure of a cycle."""
    rollout = collect_rollout(policy, items, config, generator)
    return rollout.sampled_reward_mean, rollout.greedy_reward_mean


def _pad_candidates(batch: Sequence[ItemRollout], frames: int) -> tuple[torch.Tensor, ...]:
    """Stack the items' candidates: paths, old log-probs, mask (B, K, T) and advantages (B, K)."""
    k = max(len(r.paths) for r in batch)
    paths = torch.zeros(len(batch), k, frames, dtype=torch.long)
    old = torch.zeros(len(batch), k, frames)
    mask = torch.zeros(len(batch), k, frames, dtype=torch.bool)
    advantages = torch.zeros(len(batch), k)
    for i, r in enumerate(batch):
        n, t = r.paths.shape
        paths[i, :n, :t] = r.paths
        old[i, :n, :t] = r.old_log_probs
        mask[i, :n, :t] = True
        advantages[i, :n] = r.advantages
    return paths, old, mask, advantages


def _ref_log_probs(batch: Sequence[ItemRollout], frames: int, vocab: int) -> torch.Tensor:
    ref = torch.zeros(len(batch), frames, vocab)
    for i, r in enumerate(batch):
        ref[i, : r.frames] = r.ref_log_probs
    return ref


ReplaySampler = Callable[[int, random.Random], list[tuple[np.ndarray, list[int]]]]
"""(count, rng) -> `count` base-corpus utterances as (float32 samples, target ids)."""


def _minibatch_loss(policy: Policy, batch: Sequence[ItemRollout], drawn: list | None, kl_coef: float,
                    config: PPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Stages 1-3 for one minibatch: its loss (a scalar tensor with its graph) and its figures."""
    # 1. forward
    logits, log_probs, frame_lengths = forward_log_probs(policy, [r.item.samples for r in batch])
    frames = log_probs.shape[1]
    frame_mask = torch.arange(frames)[None, :] < frame_lengths[:, None]  # (B, T)
    loss = torch.zeros(())
    stats: dict[str, float] = {}
    # 2. PPO terms
    ref = _ref_log_probs(batch, frames, log_probs.shape[-1])
    kl = masked_mean(kl_to_reference(log_probs, ref), frame_mask)
    ent = masked_mean(entropy(log_probs), frame_mask)
    if config.uses_rewards:
        paths, old, mask, advantages = _pad_candidates(batch, frames)
        new = path_log_probs(log_probs, paths)
        policy_loss = clipped_policy_loss(new, old, advantages, mask, config.clip_range)
        loss = loss + policy_loss.loss + kl_coef * kl - config.entropy_coef * ent
        stats.update(policy_loss=float(policy_loss.loss.detach()),
                     clip_fraction=float(policy_loss.clip_fraction), approx_kl=float(policy_loss.approx_kl))
    # 3. supervised (ptx) terms
    ptx = torch.zeros(())
    with_target = [i for i, r in enumerate(batch) if r.target_ids]
    if config.uses_targets and with_target:
        sft = ctc_loss(logits[with_target], frame_lengths[with_target],
                       _labels([batch[i].target_ids for i in with_target]))
        ptx = ptx + config.sft_coef * sft
        stats["sft_loss"] = float(sft.detach())
    if drawn:
        replay_logits, _, replay_frames = forward_log_probs(policy, [s for s, _ in drawn])
        replay_loss = ctc_loss(replay_logits, replay_frames, _labels([ids for _, ids in drawn]))
        ptx = ptx + config.replay_coef * replay_loss
        stats["replay_loss"] = float(replay_loss.detach())
    loss = loss + ptx
    stats.update(kl=float(kl.detach()), entropy=float(ent.detach()), ptx_loss=float(ptx.detach()),
                 loss=float(loss.detach()))
    return loss, stats


MinibatchGradients = Callable[[Policy, Sequence, list | None, float, PPOConfig, float], dict[str, float]]
"""(policy, minibatch of item rollouts, replay draws, kl_coef, config, scale) -> the minibatch's figures (named as
StepStats.minibatch_statistics), having added scale x the gradient of its loss to the parameters' .grad (a policy
kind's stages 1-3)."""


def ctc_minibatch_gradients(policy: Policy, batch: Sequence[ItemRollout], drawn: list | None, kl_coef: float,
                            config: PPOConfig, scale: float) -> dict[str, float]:
    """MinibatchGradients of the CTC kinds."""
    loss, figures = _minibatch_loss(policy, batch, drawn, kl_coef, config)
    (loss * scale).backward()
    return figures


def ppo_update(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    kl_controller: AdaptiveKLController,
    rollout: Rollout,
    config: PPOConfig,
    *,
    replay: ReplaySampler | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    data_parallel: DataParallel = SINGLE,
    minibatch_gradients: MinibatchGradients = ctc_minibatch_gradients,
) -> UpdateReport:
    """`config.epochs` passes over the rollout in minibatches; returns per-step statistics.

    One optimizer step takes `gradient_accumulation_steps` x `data_parallel.world_size` consecutive
    minibatches and follows the mean of their losses; under data parallelism minibatch j of a step is
    computed by process j mod world_size and the gradients are summed across processes before the
    step, so every process steps alike (trainer/distributed.py). Every process walks every minibatch
    (shuffle and replay draws use the same seeded generator everywhere) and computes only its own.
    Raises UpdateAborted (between steps) as soon as `should_stop()` is true.
    """
    rng = random.Random(config.seed)
    report = UpdateReport()
    items = list(rollout.items)
    if not items:
        return report
    policy.eval()  # see stage 1 in the module docstring
    per_step = config.gradient_accumulation_steps * data_parallel.world_size
    draws_replay = replay is not None and config.replay_coef > 0 and config.replay_per_minibatch > 0
    averaged = StepStats.minibatch_statistics()
    for epoch in range(config.epochs):
        rng.shuffle(items)
        minibatches = [items[s : s + config.minibatch_size] for s in range(0, len(items), config.minibatch_size)]
        for first in range(0, len(minibatches), per_step):
            if should_stop():
                raise UpdateAborted(f"stopped at epoch {epoch}, step {report.steps}")
            step = minibatches[first : first + per_step]
            kl_coef = kl_controller.value
            optimizer.zero_grad(set_to_none=True)
            sums, counts = [0.0] * len(averaged), [0.0] * len(averaged)
            for j, batch in enumerate(step):
                drawn = replay(config.replay_per_minibatch, rng) if draws_replay else None
                if not data_parallel.owns(j):
                    continue
                # The step follows the mean loss of its minibatches.
                figures = minibatch_gradients(policy, batch, drawn, kl_coef, config, 1.0 / len(step))
                for k, name in enumerate(averaged):
                    if name in figures:
                        sums[k] += figures[name]
                        counts[k] += 1
            # 4. step
            data_parallel.sum_gradients(policy.parameters())
            totals = data_parallel.sum(sums + counts)
            means = {name: totals[k] / totals[len(sums) + k] for k, name in enumerate(averaged)
                     if totals[len(sums) + k] > 0}
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip_norm)
            optimizer.step()
            stats = StepStats(epoch=epoch, **means, step=report.steps, reward_mean=rollout.reward_mean,
                              reward_std=rollout.reward_std, kl_coef=kl_coef, grad_norm=float(grad_norm))
            if config.uses_rewards:
                kl_controller.update(stats.kl)
            report.history.append(stats)
            report.steps += 1
            log.info(
                "ppo step %d (epoch %d): reward %.3f±%.3f kl %.4f approx_kl %.4f clip %.3f entropy %.3f "
                "policy_loss %.4f ptx_loss %.4f kl_coef %.4f grad_norm %.3f",
                report.steps, epoch, rollout.reward_mean, rollout.reward_std, stats.kl, stats.approx_kl or 0.0,
                stats.clip_fraction or 0.0, stats.entropy, stats.policy_loss or 0.0, stats.ptx_loss, stats.kl_coef,
                stats.grad_norm,
            )
    return report


__all__ = [
    "ItemRollout",
    "MinibatchGradients",
    "ctc_minibatch_gradients",
    "ReplaySampler",
    "Rollout",
    "StepStats",
    "UpdateAborted",
    "UpdateReport",
    "collect_rollout",
    "forward_log_probs",
    "mean_rewards",
    "ppo_update",
]
