"""trainer/ppo.py: each loss piece against a hand-computed value on tiny tensors, and a toy PPO run."""

from __future__ import annotations

import math

import pytest
import torch
from voxloop.core.decoder import collapse_path
from voxloop.core.rewards import char_edit_reward
from voxloop.trainer.config import PPOConfig
from voxloop.trainer.ppo import (
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

torch.set_num_threads(1)


def test_ratio_and_clipping_match_a_hand_computed_surrogate():
    # One utterance, two paths of two frames; eps = 0.2.
    # path 0 (A = +1): ratios 1.5 (clipped to 1.2: term -1.2) and 0.5 (unclipped -0.5 is larger: -0.5)
    # path 1 (A = -1): ratios 1.5 (unclipped 1.5 is larger) and 0.5 (clipped 0.8 is larger)
    new = torch.log(torch.tensor([[[1.5, 0.5], [1.5, 0.5]]]))
    old = torch.zeros(1, 2, 2)
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    result = clipped_policy_loss(new, old, advantages, mask, clip_range=0.2)
    assert result.loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert result.clip_fraction.item() == pytest.approx(1.0)  # |r - 1| = 0.5 > 0.2 everywhere
    expected_k3 = ((1.5 - 1 - math.log(1.5)) + (0.5 - 1 - math.log(0.5))) / 2
    assert result.approx_kl.item() == pytest.approx(expected_k3)


def test_clipped_loss_ignores_masked_frames_and_counts_only_clipped_ratios():
    new = torch.log(torch.tensor([[[1.1, 9.0]]]))  # frame 1 is padding: its huge ratio must not count
    old = torch.zeros(1, 1, 2)
    mask = torch.tensor([[[True, False]]])
    result = clipped_policy_loss(new, old, torch.tensor([[2.0]]), mask, clip_range=0.2)
    assert result.loss.item() == pytest.approx(-2.0 * 1.1)
    assert result.clip_fraction.item() == 0.0


def test_clipped_loss_gradient_vanishes_once_the_ratio_passes_the_clip_in_the_advantage_direction():
    new = torch.log(torch.tensor([[[1.5]]])).requires_grad_()
    clipped_policy_loss(new, torch.zeros(1, 1, 1), torch.tensor([[1.0]]), torch.ones(1, 1, 1, dtype=torch.bool),
                        0.2).loss.backward()
    assert new.grad.abs().item() == 0.0


def test_exact_kl_and_entropy_match_hand_computed_values():
    p = torch.log(torch.tensor([[[0.5, 0.5]]]))
    q = torch.log(torch.tensor([[[0.25, 0.75]]]))
    assert kl_to_reference(p, q).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    assert kl_to_reference(p, p).item() == pytest.approx(0.0)
    assert entropy(p).item() == pytest.approx(math.log(2))
    assert entropy(q).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_group_advantages_subtract_the_group_mean_and_normalize_by_its_std():
    rewards = torch.tensor([[0.0, -1.0, -0.5, 7.0]])
    valid = torch.tensor([[True, True, True, False]])  # the 7.0 is padding of the group
    plain = group_advantages(rewards, valid)
    assert plain[0].tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    std = math.sqrt((0.25 + 0.25 + 0.0) / 3)
    normalized = group_advantages(rewards, valid, normalize=True)
    assert normalized[0].tolist() == pytest.approx([0.5 / std, -0.5 / std, 0.0, 0.0], rel=1e-5)
    # A group whose candidates all scored the same carries no signal.
    assert group_advantages(torch.tensor([[-0.3, -0.3]]), torch.ones(1, 2, dtype=torch.bool), True).abs().max() == 0


def test_masked_mean_counts_only_masked_in_values():
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([True, True, False])).item() == 2.0
    assert masked_mean(torch.tensor([5.0]), torch.tensor([False])).item() == 0.0


def test_adaptive_kl_coefficient_grows_above_target_and_shrinks_below_it():
    controller = AdaptiveKLController(0.1, target=0.02, horizon=10)
    assert controller.update(0.1) == pytest.approx(0.1 * (1 + 0.2 / 10))  # error clipped at +0.2
    controller = AdaptiveKLController(0.1, target=0.02, horizon=10)
    assert controller.update(0.018) == pytest.approx(0.1 * (1 - 0.1 / 10))
    fixed = AdaptiveKLController(0.1, target=None, horizon=10)
    assert fixed.update(5.0) == 0.1


def test_path_log_probs_gathers_each_frames_token():
    log_probs = torch.log(torch.tensor([[[0.1, 0.9], [0.7, 0.3]]]))  # (1, T=2, V=2)
    paths = torch.tensor([[[1, 0], [0, 1]]])  # (1, K=2, T=2)
    expected = torch.log(torch.tensor([[[0.9, 0.7], [0.1, 0.3]]]))
    assert torch.allclose(path_log_probs(log_probs, paths), expected)


def test_sampled_paths_follow_the_distribution_and_the_seed():
    one_hot = torch.log(torch.tensor([[[1e-9, 1.0, 1e-9], [1.0, 1e-9, 1e-9], [1e-9, 1e-9, 1.0]]]))
    paths = sample_paths(one_hot, 5, torch.Generator().manual_seed(0))
    assert paths.shape == (1, 5, 3)
    assert (paths == greedy_paths(one_hot)[:, None, :]).all()
    uniform = torch.zeros(2, 50, 4)
    a = sample_paths(uniform, 3, torch.Generator().manual_seed(1))
    b = sample_paths(uniform, 3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and len(a.unique()) == 4


def test_collapse_merges_repeats_and_drops_blanks():
    assert collapse_path([0, 3, 3, 0, 3, 4, 4, 0]) == [3, 3, 4]
    assert collapse_path(torch.tensor([0, 0])) == []


def test_best_alignment_collapses_to_the_target_and_refuses_too_few_frames():
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(12, 6), -1)
    alignment = best_alignment(log_probs, [2, 2, 5])
    assert alignment.shape == (12,)
    assert collapse_path(alignment) == [2, 2, 5]
    assert best_alignment(log_probs[:3], [2, 2, 5]) is None  # a repeated token needs a blank between
    assert collapse_path(best_alignment(log_probs, [])) == []


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="objective must be one of"):
        PPOConfig(objective="dpo")
    with pytest.raises(ValueError, match="clip_range"):
        PPOConfig(clip_range=1.5)
    assert PPOConfig(objective="sft").uses_targets and not PPOConfig(objective="sft").uses_rewards


def test_ppo_steps_raise_the_mean_reward_of_a_toy_ctc_policy():
    """A free (T, V) logit table as the policy; reward = -char edit distance to "ab"."""
    vocab = ["_", "a", "b", "c"]
    target = "ab"
    torch.manual_seed(0)
    logits = torch.zeros(1, 6, len(vocab), requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 8, 6, dtype=torch.bool)

    def rollout():
        with torch.no_grad():
            log_probs = torch.log_softmax(logits, -1)
            paths = sample_paths(log_probs, 8, generator)
            texts = ["".join(vocab[t] for t in collapse_path(p)) for p in paths[0]]
            rewards = torch.tensor([[char_edit_reward(t, target) for t in texts]])
        return paths, path_log_probs(log_probs, paths), rewards

    first_rewards = []
    for step in range(40):
        paths, old, rewards = rollout()
        if step < 5:
            first_rewards.append(rewards.mean().item())
        advantages = group_advantages(rewards, torch.ones_like(rewards, dtype=torch.bool))
        for _ in range(2):
            new = path_log_probs(torch.log_softmax(logits, -1), paths)
            loss = clipped_policy_loss(new, old, advantages, mask, 0.2).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    final = torch.stack([rollout()[2].mean() for _ in range(5)]).mean().item()
    assert final > sum(first_rewards) / len(first_rewards) + 0.3
    assert final > -0.3
