"""Model FLOPs against hand computations on a toy shape (tunelab/flops.py)."""

from __future__ import annotations

import pytest

from tunelab.flops import forward_flops, generation_flops, train_flops
from tunelab.presets import PRESETS, ModelShape

# One OPT block, hidden h = 4, ffn 8, vocab 10. Matmul weights of the body:
# q, k, v, out 4 x 4*4 = 64, fc1 + fc2 2 x 4*8 = 64 -> W = 128; LM head 10 x 4 = 40.
# Attention per token over a context of s: 4 * layers * h * s = 16 s.
TOY = ModelShape("opt", vocab_size=10, hidden_size=4, num_layers=1, num_heads=1, ffn_dim=8,
                 max_positions=64)  # fmt: skip


def test_forward_counts_the_lm_head_where_logits_are_computed():
    # 2 sequences of 3 tokens: 6 x (2 x 128 + 16 x 3) = 1824, plus 2 x 40 per logit.
    assert forward_flops(TOY, 2, 3) == 1824 + 6 * 80  # every position
    assert forward_flops(TOY, 2, 3, logits=1) == 1824 + 2 * 80  # PPO: the answer's only
    assert forward_flops(TOY, 2, 3, logits=0) == 1824  # value / reward model: no LM head
    assert forward_flops(TOY, 2, 3, logits=0, adapters=10) == 1824 + 6 * 2 * 10


def test_full_training_is_three_forwards():
    assert train_flops(TOY, 2, 3) == 3 * 2304  # 6 per weight per token
    assert train_flops(TOY, 2, 3, logits=0) == 3 * 1824


def test_lora_costs_four_per_frozen_weight_and_six_per_adapter():
    # Per token 4 x 128 (frozen: forward + input gradient) + 6 x 10 adapters + 3 x 16 x 3
    # attention = 716; 6 tokens -> 4296; the frozen head at 1 position per row: 2 x 4 x 40.
    assert train_flops(TOY, 2, 3, logits=1, adapters=10) == 4296 + 320
    # On OPT-1.3b at one token (attention negligible) LoRA's backbone costs 4N, not 6N.
    opt = PRESETS["opt-1.3b"]
    assert train_flops(opt, 1, 1, adapters=0) / train_flops(opt, 1, 1) == pytest.approx(
        4 / 6, rel=1e-4
    )


def test_generation_is_a_prefill_and_cached_forwards_with_one_logit_each():
    # Prompt 3, answer 2: prefill 3 x (256 + 16 x 3) = 912 gives token 0; token 1 needs one
    # forward of token 0 over 4 positions, 256 + 64 = 320; logits for 2 tokens, 2 x 80.
    assert generation_flops(TOY, 2, prompt_len=3, answer_len=2) == 2 * (912 + 320 + 160)
    assert generation_flops(TOY, 1, 3, 1) == 912 + 80  # the prefill alone


def test_nonpad_throughput_counts_answers_for_generation_and_sequences_elsewhere():
    from tunelab.pipeline.ppo import nonpad_throughput

    rates = nonpad_throughput({"ppo_generate": 2.0, "ppo_e2e": 4.0}, 100, 300)
    assert rates == {
        "perf/ppo_generate_nonpad_tokens_per_s": 50.0,
        "perf/ppo_e2e_nonpad_tokens_per_s": 75.0,
    }
