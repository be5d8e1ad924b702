"""PPO for a CTC policy, as small pure tensor functions, plus the one config dataclass of its knobs.

The policy pi_theta gives, for each encoder frame t of an utterance, a distribution over the CTC
vocabulary (index 0 = blank). An *action* is a CTC path: one token per frame; its text is the path
collapsed (repeats merged, blanks dropped). A path's log-probability is the sum of its per-frame
log-probs, so PPO works per frame, exactly as RLHF's token-level PPO works per token:

- candidates per utterance: K paths sampled frame by frame from pi_old, the greedy path, and, when
  the feedback gives a target, the target's best (Viterbi) CTC alignment;
- advantage of a candidate: its reward minus the group mean (GRPO's group baseline,
  https://arxiv.org/abs/2402.03300 eq. 3), optionally divided by the group std;
- clipped surrogate per frame, every frame of a path carrying the path's advantage
  (https://arxiv.org/abs/1707.06347 eq. 7);
- exact KL to the frozen reference per frame, sum_v p(v) (log p(v) - log q(v)) -- the full
  distributions are at hand, so no estimator is needed for the penalty; `approx_kl` (pi_old vs
  pi_theta on the sampled frames) is the k3 estimator of http://joschu.net/blog/kl-approx.html,
  reported as a diagnostic;
- adaptive KL coefficient (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593 sec. 2.2);
- entropy bonus; the supervised "ptx" terms (CTC on feedback targets, CTC on replayed base data;
  InstructGPT's PPO-ptx, https://arxiv.org/abs/2203.02155 eq. 2) are added by the caller
  (trainer/update.py).

Shapes: B utterances, K candidate paths per utterance, T encoder frames, V vocabulary.
`frame_mask` (B, T) is True on real frames, False on padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torchaudio.functional

Objective = Literal["ppo", "sft", "ppo+sft"]
OBJECTIVES: tuple[str, ...] = ("ppo", "sft", "ppo+sft")


@dataclass(frozen=True)
class PPOConfig:
    """Every knob of one cycle's policy update (PPO and its ptx terms)."""

    objective: Objective = "ppo+sft"
    """ppo: reward terms only; sft: supervised CTC on feedback targets only; ppo+sft: both (PPO-ptx)."""
    samples_per_utterance: int = 4
    """K: CTC paths sampled from pi_old per utterance (the greedy path and target alignment come on top)."""
    sampling_temperature: float = 1.0
    """Temperature of the per-frame distributions paths are sampled from (1 = the policy itself)."""
    include_greedy: bool = True
    """Add the greedy (best-path) candidate: usually what the user was shown."""
    include_target_alignment: bool = True
    """Add the Viterbi alignment of the feedback target: a candidate that spells the right answer."""
    reward_unit: Literal["char", "word"] = "char"
    """Edit-distance reward counted in characters (denser signal) or words (what WER counts)."""
    normalize_advantages: bool = False
    """Divide group advantages by the group std (GRPO); off: measured to drift more (issue #5)."""
    clip_range: float = 0.2
    """epsilon of the clipped ratio: the ratio is clipped to [1 - eps, 1 + eps]."""
    init_kl_coef: float = 1.0
    """beta at the first cycle: weight of the exact per-frame KL to the reference policy."""
    target_kl: float | None = 0.02
    """nats/frame the adaptive controller steers the KL to; None keeps beta fixed."""
    kl_horizon: int = 200
    """Updates over which the controller may change beta by about e^(0.2) (Ziegler et al.)."""
    entropy_coef: float = 0.001
    """Weight of the per-frame entropy bonus."""
    sft_coef: float = 1.0
    """Weight of the CTC loss on feedback targets (corrections, acceptances, chosen alternatives)."""
    replay_coef: float = 1.0
    """Weight of the CTC loss on replayed base-corpus utterances (0 = no replay)."""
    replay_per_minibatch: int = 8
    """Base-corpus utterances replayed with each minibatch."""
    epochs: int = 2
    """Passes over the rollouts (with 4 the shipped model broke the 1-point anchor margin; bench/trainer_cycle.py)."""
    minibatch_size: int = 16
    """Feedback utterances per minibatch (per gradient step, without accumulation)."""
    two_pass_learning_rate: float = 1e-5
    """AdamW learning rate of a two-pass (Whisper) policy: a pretrained 38 M-parameter decoder moves too far at
    the CTC model's 1e-4 (measured: +2.2 anchor WER points in one cycle, the gate refused it)."""
    head_ctc_coef: float = 1.0
    """Weight of the CTC loss on feedback targets that trains a two-pass (Whisper) policy's first-pass head
    (objective sft, ppo+sft; its interim results learn the corrected words too)."""
    rows_per_forward: int = 16
    """A two-pass policy's minibatch runs its decoder on at most this many candidate transcripts at a time
    (each holds full distributions over Whisper's 51,864 tokens: this bounds the update's memory)."""
    gradient_accumulation_steps: int = 1
    """Minibatches one optimizer step sums the gradients of (their mean loss). Under torchrun with N processes a
    step takes N times as many, one share per process: N processes update exactly as one process with N times
    the accumulation (trainer/distributed.py)."""
    learning_rate: float = 1e-4
    """AdamW learning rate (constant within and across cycles; 3e-4 regressed the anchor set by 1.4-1.7 points)."""
    weight_decay: float = 0.0
    """AdamW weight decay (0: pull toward the reference is the KL term's job)."""
    grad_clip_norm: float = 1.0
    """Global gradient-norm clip."""
    seed: int = 0
    """Seed of path sampling, minibatch order and replay draws."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES} (got {self.objective!r})")
        if self.samples_per_utterance < 0 or (self.samples_per_utterance == 0 and not self.include_greedy):
            raise ValueError("samples_per_utterance must be >= 0, and > 0 unless include_greedy is on")
        if self.sampling_temperature <= 0:
            raise ValueError(f"sampling_temperature must be > 0 (got {self.sampling_temperature})")
        if not 0 < self.clip_range < 1:
            raise ValueError(f"clip_range must be in (0, 1), e.g. 0.2 (got {self.clip_range})")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError("target_kl must be > 0 nats/frame, or None for a fixed KL coefficient")
        if min(self.init_kl_coef, self.entropy_coef, self.sft_coef, self.replay_coef, self.head_ctc_coef) < 0:
            raise ValueError("init_kl_coef, entropy_coef, sft_coef, replay_coef and head_ctc_coef must be >= 0")
        if self.rows_per_forward < 1:
            raise ValueError("rows_per_forward must be >= 1")
        if self.epochs < 1 or self.minibatch_size < 1 or self.kl_horizon < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("epochs, minibatch_size, gradient_accumulation_steps and kl_horizon must be >= 1")
        if self.learning_rate <= 0 or self.two_pass_learning_rate <= 0 or self.grad_clip_norm <= 0:
            raise ValueError("learning_rate, two_pass_learning_rate and grad_clip_norm must be > 0")

    @property
    def uses_rewards(self) -> bool:
        return self.objective in ("ppo", "ppo+sft")

    @property
    def uses_targets(self) -> bool:
        return self.objective in ("sft", "ppo+sft")


# --- masked reductions ----------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is True (0 when nothing is masked in)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


# --- CTC paths ------------------------------------------------------------------------------------


def sample_paths(
    log_probs: torch.Tensor, num_samples: int, generator: torch.Generator | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """Sample CTC paths frame by frame: log_probs (B, T, V) -> paths (B, num_samples, T) long.

    Frames are independent given the audio (CTC's conditional independence), so a path is one
    categorical draw per frame. Padding frames get arbitrary tokens; mask them downstream.
    """
    batch, frames, vocab = log_probs.shape
    probs = torch.softmax(log_probs.detach().float() / temperature, dim=-1).reshape(batch * frames, vocab)
    draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)  # (B*T, N)
    return draws.reshape(batch, frames, num_samples).permute(0, 2, 1).contiguous()


def greedy_paths(log_probs: torch.Tensor) -> torch.Tensor:
    """Best path per utterance: (B, T, V) -> (B, T)."""
    return log_probs.argmax(dim=-1)


def collapse_path(path: list[int] | torch.Tensor, blank: int = 0) -> list[int]:
    """CTC collapse of one path (its real frames only): merge repeats, then drop blanks."""
    tokens = path.tolist() if isinstance(path, torch.Tensor) else list(path)
    return [t for i, t in enumerate(tokens) if t != blank and (i == 0 or t != tokens[i - 1])]


def best_alignment(log_probs: torch.Tensor, target: list[int], blank: int = 0) -> torch.Tensor | None:
    """The most likely CTC path that collapses to `target`: (T, V) -> (T,) long, or None if none fits.

    Viterbi forced alignment (torchaudio.functional.forced_align). None when the target needs more
    frames than there are (len(target) + repeated neighbours > T).
    """
    frames = log_probs.shape[0]
    repeats = sum(1 for a, b in zip(target, target[1:], strict=False) if a == b)
    if not target:
        return torch.full((frames,), blank, dtype=torch.long)
    if len(target) + repeats > frames:
        return None
    alignment, _ = torchaudio.functional.forced_align(
        log_probs.detach().float()[None], torch.tensor([target], dtype=torch.int32), blank=blank
    )
    return alignment[0].long()


def path_log_probs(log_probs: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """Per-frame log-prob of each path: log_probs (B, T, V), paths (B, K, T) -> (B, K, T)."""
    batch, k, frames = paths.shape
    expanded = log_probs.unsqueeze(1).expand(batch, k, frames, log_probs.shape[-1])
    return expanded.gather(-1, paths.unsqueeze(-1)).squeeze(-1)


# --- advantages -----------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor, valid: torch.Tensor, normalize: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """Reward minus its group's mean, per utterance: rewards (B, K), valid (B, K) bool -> (B, K).

    Invalid candidates (padding of the group) get advantage 0. With `normalize`, each group is also
    divided by its (population) std, GRPO-style; a group whose rewards are all equal gets 0.
    """
    weights = valid.to(rewards.dtype)
    count = weights.sum(-1, keepdim=True).clamp(min=1.0)
    mean = (rewards * weights).sum(-1, keepdim=True) / count
    advantages = (rewards - mean) * weights
    if normalize:
        std = ((advantages**2).sum(-1, keepdim=True) / count).sqrt()
        advantages = advantages / (std + eps)
    return advantages


# --- the loss pieces ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor
    """Clipped surrogate loss (scalar, to minimize)."""
    clip_fraction: torch.Tensor
    """Share of (path, frame) pairs whose ratio was clipped (scalar)."""
    approx_kl: torch.Tensor
    """k3 estimate of KL(pi_old || pi_theta) per frame on the candidates' frames (scalar)."""


def clipped_policy_loss(
    new_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> PolicyLoss:
    """PPO's clipped surrogate per frame (https://arxiv.org/abs/1707.06347 eq. 7).

    new_log_probs, old_log_probs, mask: (B, K, T) -- a path's per-frame log-probs under pi_theta and
    pi_old, and which frames count; advantages (B, K), one per path, shared by its frames.
    loss = mean over masked frames of max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(new - old).
    """
    log_ratio = new_log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(-1)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_range).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)  # k3, http://joschu.net/blog/kl-approx.html
    return PolicyLoss(loss, clip_fraction, approx_kl)


def kl_to_reference(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi_theta || pi_ref) per frame: (B, T, V) x2 -> (B, T) nats; sum_v p (log p - log q)."""
    return (log_probs.exp() * (log_probs - ref_log_probs)).sum(-1)


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy per frame: (B, T, V) log-probs -> (B, T) nats."""
    return -(log_probs.exp() * log_probs).sum(-1)


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).

    Ziegler et al. 2019, https://arxiv.org/abs/1909.08593 sec. 2.2; TRL's AdaptiveKLController.
    With target None, beta stays fixed.
    """

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int):
        self.value = float(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int = 1) -> float:
        if self.target is not None:
            proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


__all__ = [
    "OBJECTIVES",
    "AdaptiveKLController",
    "Objective",
    "PPOConfig",
    "PolicyLoss",
    "best_alignment",
    "clipped_policy_loss",
    "collapse_path",
    "entropy",
    "greedy_paths",
    "group_advantages",
    "kl_to_reference",
    "masked_mean",
    "path_log_probs",
    "sample_paths",
]
