"""Step 1, supervised fine-tuning: causal-LM loss on prompt + chosen response.

Runs on the actor's engine settings (ZeRO stage, offload, LoRA, checkpointing) with the SFT
learning rate; returns the fine-tuned weights (LoRA merged) for the PPO actor and reference.
"""

from __future__ import annotations

from tunelab.flops import train_flops
from tunelab.pipeline.batching import position_ids
from tunelab.pipeline.context import TrialContext
from tunelab.pipeline.models import (
    build_causal_lm,
    consolidated_state_dict,
    prepare_for_training,
    train_engine,
)
from tunelab.pipeline.supervised import loss_metrics, train_steps
from tunelab.pipeline.telemetry import throughput


def run_sft(ctx: TrialContext):
    """Train for sft.steps optimizer steps; returns (metrics, state_dict, loss per step)."""
    config, runtime, data = ctx.config, ctx.runtime, ctx.data.sft
    batch, accum = config.batch.train_micro, config.batch.grad_accum
    with ctx.memory.stage("sft"):
        model = prepare_for_training(
            build_causal_lm(ctx.actor_source, ctx.tokenizer), config.actor
        )
        engine = train_engine(model, ctx.ds_configs["sft"])
        engine.train()

        def loss_of(rows: list[int]):
            ids, mask = data.rows(rows, runtime.device)
            labels = ids.masked_fill(mask == 0, -100)
            return engine(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                labels=labels, use_cache=False,
            ).loss  # fmt: skip

        losses = train_steps(ctx, engine, "sft", config.sft.steps, len(data.ids), config.seed,
                             loss_of)  # fmt: skip
        weights = consolidated_state_dict(engine)
        engine.destroy()
    timed_steps = config.sft.steps - config.warmup_steps
    samples = timed_steps * batch * accum * runtime.world_size
    metrics = {
        "sft/steps": config.sft.steps,
        **loss_metrics("sft", losses),
        **throughput(
            "sft",
            ctx.timer.seconds["sft"],
            samples,
            samples * ctx.sequence_len,
            timed_steps * train_flops(ctx.actor_shape, batch * accum, ctx.sequence_len),
        ),
    }
    return metrics, weights, losses
