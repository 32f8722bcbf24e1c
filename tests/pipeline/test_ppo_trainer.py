"""PPO's trainer on one rank: experience is scored as training then scores it."""

from __future__ import annotations

import contextlib

import torch


def test_experience_is_scored_as_the_first_training_forward(
    in_process_trials, tiny_config, monkeypatch
):
    """With dropout off, the log-probabilities and values that make experience equal, bit for
    bit, those of the first training forward on the same rows: a first policy ratio of
    exactly 1, a first value clip that clips nothing. On the CPU in bf16 that takes one
    attention kernel for both (models.training_attention): torch's default kernel, no-grad,
    gives other figures."""
    from tunelab.pipeline import ppo
    from tunelab.pipeline.models import math_attention
    from tunelab.pipeline.run import build_context
    from tunelab.pipeline.runtime import start_runtime
    from tunelab.pipeline.telemetry import MemoryTracker

    config = tiny_config("sft.steps=0", "rm.steps=0", "critic.dropout=0.0")
    assert config.actor.dropout == 0.0 and config.precision == "bf16"
    runtime = start_runtime(config)
    memory = MemoryTracker(runtime.device)
    trainer = None
    try:
        ctx = build_context(config, runtime, memory)
        trainer = ppo.PPOTrainer(ctx, None, None)
        trainer.set_training(False)
        seq, mask, answer_mask, _ = trainer.generate(*ctx.data.prompts.rows(
            list(range(8)), runtime.device))  # fmt: skip
        assert math_attention(seq.device, torch.bfloat16, seq.shape[1])
        experience = trainer.make_experience(seq, mask, answer_mask)
        trainer.set_training(True)
        logprobs = trainer._answer_logprobs(trainer.actor, seq, mask)
        values = trainer._answer_values(trainer.critic, seq, mask)
        assert logprobs.requires_grad and values.requires_grad
        assert torch.equal(logprobs.detach(), experience.logprobs)
        assert torch.equal(values.detach(), experience.values)
        with torch.no_grad(), monkeypatch.context() as patch:
            patch.setattr(ppo, "training_attention", lambda *_: contextlib.nullcontext())
            default_kernel = trainer._answer_logprobs(trainer.actor, seq, mask)
        assert not torch.equal(default_kernel, experience.logprobs)
    finally:
        if trainer is not None:
            trainer.close()
        memory.close()
