"""PPO maths against values computed by hand (DeepSpeed-Chat step 3 formulas)."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.pipeline import ppo_math


def test_answer_mask_keeps_up_to_first_eos():
    answers = torch.tensor([[5, 6, 2, 1, 1], [5, 6, 7, 8, 9], [2, 1, 1, 1, 1]])
    expected = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ppo_math.answer_mask(answers, eos_token_id=2).tolist() == expected


def test_rewards_kl_penalty_and_clipped_score_on_last_token():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards = ppo_math.kl_penalized_rewards(
        logprobs, ref, torch.tensor([10.0, -1.0]), mask, kl_coef=0.1, reward_clip=5.0
    )
    # Row 0: -0.1 * (0.5, 0, masked) and the score clamped to 5 on the last kept token.
    assert rewards[0].tolist() == pytest.approx([-0.05, 5.0, 0.0])
    assert rewards[1].tolist() == pytest.approx([0.0, 0.0, -1.0])


def test_gae_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 1, 1]])
    gamma, lam = 0.9, 0.5
    # Backwards: delta2 = 1 - 3 = -2; delta1 = 0 + 0.9*3 - 2 = 0.7; delta0 = 0 + 0.9*2 - 1 = 0.8
    a2 = -2.0
    a1 = 0.7 + gamma * lam * a2
    a0 = 0.8 + gamma * lam * a1
    advantages, returns = ppo_math.gae_advantages(values, rewards, mask, gamma, lam)
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2])
    assert returns[0].tolist() == pytest.approx([a0 + 1, a1 + 2, a2 + 3])


def test_gae_stops_at_the_end_of_the_answer():
    values = torch.tensor([[1.0, 2.0, 7.0]])
    rewards = torch.tensor([[0.0, 1.0, 9.0]])
    advantages, _ = ppo_math.gae_advantages(values, rewards, torch.tensor([[1, 1, 0]]), 1.0, 0.95)
    # Terminal at t=1: A1 = 1 - 2 = -1; A0 = (0 + 2 - 1) + 0.95 * -1
    assert advantages[0].tolist() == pytest.approx([1 - 0.95, -1.0, 0.0])


def test_policy_loss_clips_and_reports_fraction():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    loss, clip_fraction = ppo_math.policy_loss(new, old, advantages, torch.ones(1, 4), 0.2)
    # Per token max(-A r, -A clip(r)): -1, -1.2 (clipped), 0.8 (clipped at 0.8), -1.1
    assert loss.item() == pytest.approx((-1.0 - 1.2 + 0.8 - 1.1) / 4)
    assert clip_fraction.item() == pytest.approx(0.5)


def test_value_loss_takes_the_larger_of_clipped_and_unclipped():
    values = torch.tensor([[2.0, 0.0]])
    old = torch.tensor([[1.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    loss = ppo_math.value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    # Token 0: unclipped (2-2)^2 = 0, clipped (1.2-2)^2 = 0.64; token 1: 1 both.
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.0) / 2)


def test_token_logprobs_and_sequence_kl():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert ppo_math.token_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(
        math.log(0.75)
    )
    # Temperature 2 flattens: p = sqrt(3) / (1 + sqrt(3)).
    expected = math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    assert ppo_math.token_logprobs(logits, torch.tensor([[1]]), 2.0).item() == pytest.approx(
        expected
    )
    kl = ppo_math.sequence_kl(
        torch.tensor([[-1.0, -1.0]]), torch.tensor([[-2.0, -1.5]]), torch.tensor([[1, 1]])
    )
    assert kl.item() == pytest.approx(1.5)


def test_masked_mean_of_empty_mask_is_zero():
    assert ppo_math.masked_mean(torch.ones(2, 2), torch.zeros(2, 2)).item() == 0.0
