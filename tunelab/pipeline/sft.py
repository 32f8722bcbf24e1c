"""Step 1, supervised fine-tuning: causal-LM loss on prompt + chosen response.

Runs on the actor's engine settings (ZeRO stage, offload, LoRA, checkpointing, dropout) with
the SFT learning rate; returns the fine-tuned weights (LoRA merged, on rank 0) for the PPO
actor and reference.
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
from tunelab.pipeline.supervised import stage_metrics, train_steps
from tunelab.pipeline.telemetry import throughput


def run_sft(ctx: TrialContext):
    """Train for sft.steps optimizer steps; returns (metrics, state_dict on rank 0 / None,
    loss per step)."""
    config, runtime, data = ctx.config, ctx.runtime, ctx.data.sft
    batch, accum = config.batch.train_micro, config.batch.grad_accum
    ds_config = ctx.ds_configs["sft"]
    with ctx.memory.stage("sft"):
        with ctx.memory.stage("setup"), ctx.overhead("setup"):
            model = build_causal_lm(ctx.actor_source, ctx.tokenizer, ds_config,
                                    config.actor.dropout)  # fmt: skip
            engine = train_engine(
                prepare_for_training(model, config.actor), ds_config, config.actor
            )
        ctx.record_engine("sft", engine, ctx.source_weights(ctx.actor_source))
        engine.train()

        def loss_of(rows: list[int]):
            ids, mask = data.rows(rows, runtime.device)
            labels = ids.masked_fill(mask == 0, -100)
            return engine(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                labels=labels, use_cache=False,
            ).loss  # fmt: skip

        losses = train_steps(ctx, engine, "sft", config.sft.steps, len(data.ids),
                             data.ids.shape[1], config.seed, loss_of)  # fmt: skip
        with ctx.overhead("handoff"):
            weights = consolidated_state_dict(engine)
        engine.destroy()
    timed = ctx.timed_steps("sft", config.sft.steps)
    samples = len(timed) * batch * accum * runtime.world_size
    metrics = {
        **stage_metrics(ctx, "sft", losses),
        **throughput(
            "sft",
            ctx.timer.seconds("sft", timed),
            samples,
            samples * ctx.sequence_len,
            len(timed)
            * train_flops(
                ctx.actor_shape, batch * accum, ctx.sequence_len, adapters=ctx.adapters("sft")
            ),
        ),
    }
    return metrics, weights, losses
