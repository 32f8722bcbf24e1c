"""PPO's start and end evaluation: common random numbers, apart from training's stream."""

from __future__ import annotations

import torch

from tunelab.data import load_preferences


def test_held_out_prompts_do_not_follow_the_trial_seed():
    def held_out(seed, eval_seed):
        return load_preferences("synthetic", 100, 20, seed=seed, eval_seed=eval_seed)[1]

    assert held_out(1, eval_seed=0) == held_out(2, eval_seed=0)
    assert held_out(1, eval_seed=0) != held_out(1, eval_seed=1)
    assert held_out(1, eval_seed=None) != held_out(2, eval_seed=None)  # null: the trial's seed


def test_evaluation_draws_apart_from_training(in_process_trials, tiny_config):
    """The same policy evaluated twice, with training draws before and between, gives the same
    answers, and leaves training's stream where it was; another eval_seed draws others."""
    from tunelab.pipeline.ppo import PPOTrainer
    from tunelab.pipeline.run import build_context
    from tunelab.pipeline.runtime import start_runtime
    from tunelab.pipeline.telemetry import MemoryTracker

    config = tiny_config("sft.steps=0", "rm.steps=0", "data.eval_size=32")
    runtime = start_runtime(config)
    memory = MemoryTracker(runtime.device)
    trainer = None
    try:
        ctx = build_context(config, runtime, memory)
        trainer = PPOTrainer(ctx, None, None)
        torch.manual_seed(1)
        first = trainer.evaluate(samples=32)
        torch.manual_seed(2)
        torch.rand(1000)  # what training would draw
        training_stream = torch.get_rng_state()
        second = trainer.evaluate(samples=32)
        assert torch.equal(torch.get_rng_state(), training_stream)
        assert second == first
        assert len(first["samples"]) == 32
        ctx.config = config.replace(eval_seed=1)
        other = trainer.evaluate(samples=32)
        assert [s["answer"] for s in other["samples"]] != [s["answer"] for s in first["samples"]]
        assert [s["prompt"] for s in other["samples"]] == [s["prompt"] for s in first["samples"]]
    finally:
        if trainer is not None:
            trainer.close()
        memory.close()
