"""PPO for a CTC policy, as small pure tensor functions (their knobs: trainer/config.py PPOConfig).

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

import torch
import torchaudio.functional

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
    "AdaptiveKLController",
    "PolicyLoss",
    "best_alignment",
    "clipped_policy_loss",
    "entropy",
    "greedy_paths",
    "group_advantages",
    "kl_to_reference",
    "masked_mean",
    "path_log_probs",
    "sample_paths",
]
