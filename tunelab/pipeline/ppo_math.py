"""PPO maths of DeepSpeed-Chat step 3 (dschat/rlhf/ppo_trainer.py) as pure tensor functions.

Shapes: B sequences, A answer positions (the generated tokens), V vocabulary. `mask` [B, A] is
1 for generated tokens up to and including the end-of-sequence token, 0 after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is 1; 0 when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    """log p(token) under softmax(logits / temperature): logits [B, A, V], tokens [B, A] -> [B, A].

    Computed through cross_entropy in fp32, so the full log-softmax is never kept.
    """
    scaled = logits.float() / temperature
    return -F.cross_entropy(scaled.transpose(1, 2), tokens, reduction="none")


def answer_mask(answers: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[B, A] mask of generated tokens up to and including the first end-of-sequence token."""
    is_eos = (answers == eos_token_id).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos
    return (eos_before == 0).long()


def kl_penalized_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    reward_clip: float,
) -> torch.Tensor:
    """Per-token rewards [B, A]: -kl_coef * (log pi - log pi_ref), plus the reward-model score
    (clamped to +-reward_clip) on the last generated token; zero after it.

    DeepSpeed-Chat's compute_rewards; scores [B].
    """
    rewards = -kl_coef * (logprobs - ref_logprobs)
    rewards = rewards * mask
    last = (mask.sum(dim=1) - 1).clamp(min=0)
    clipped = scores.clamp(-reward_clip, reward_clip).to(rewards.dtype)
    return rewards.scatter_add(1, last.unsqueeze(1), clipped.unsqueeze(1))


def gae_advantages(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the answer.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};
    returns = A + V. Values and rewards past the end are zeroed first, as DeepSpeed-Chat does.
    values, rewards, mask [B, A] -> (advantages [B, A], returns [B, A]).
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, advantages + values


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective: masked mean of max(-A * r, -A * clip(r, 1 +- eps)).

    Returns (loss scalar, fraction of tokens whose ratio lies outside 1 +- eps).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_range).float(), mask)
    return loss, clip_fraction


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> torch.Tensor:
    """0.5 * masked mean of max((V - R)^2, (V_clip - R)^2), V_clip = old V +- clip_range."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor):
    """Mean over sequences of sum_t (log pi - log pi_ref): a sample estimate of KL(pi || ref)."""
    return ((logprobs - ref_logprobs) * mask).sum(dim=1).mean()
