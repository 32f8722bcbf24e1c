"""Step 1, supervised fine-tuning: causal-LM loss on prompt + chosen response.

Runs on the actor's engine settings (ZeRO stage, offload, LoRA, checkpointing) with the SFT
learning rate; returns the fine-tuned weights (LoRA merged) for the PPO actor and reference.
"""

from __future__ import annotations

from tunelab.flops import train_flops
from tunelab.pipeline.batching import batch_indices, position_ids
from tunelab.pipeline.context import TrialContext
from tunelab.pipeline.models import (
    build_causal_lm,
    consolidated_state_dict,
    prepare_for_training,
    train_engine,
)
from tunelab.pipeline.telemetry import throughput


def run_sft(ctx: TrialContext):
    """Train for sft.steps optimizer steps; returns (metrics, state_dict, loss per step)."""
    config, runtime, data = ctx.config, ctx.runtime, ctx.data.sft
    batch, accum = config.batch.train_micro, config.batch.grad_accum
    with ctx.memory.stage("sft"):
        model = build_causal_lm(ctx.actor_source, ctx.tokenizer)
        model = prepare_for_training(model, config.actor)
        engine = train_engine(model, ctx.ds_configs["sft"])
        engine.train()
        losses = []
        for step in range(config.sft.steps):
            with ctx.timed_phase("sft", step):
                step_loss = 0.0
                for micro in range(accum):
                    rows = batch_indices(
                        len(data.ids),
                        batch,
                        step * accum + micro,
                        runtime.rank,
                        runtime.world_size,
                        config.seed,
                    )
                    ids, mask = data.rows(rows, runtime.device)
                    labels = ids.masked_fill(mask == 0, -100)
                    loss = engine(
                        input_ids=ids,
                        attention_mask=mask,
                        position_ids=position_ids(mask),
                        labels=labels,
                        use_cache=False,
                    ).loss
                    runtime.check_finite(loss, f"sft step {step}")
                    engine.backward(loss)
                    ctx.record_states("sft", engine)
                    engine.step()
                    step_loss += loss.item() / accum
            losses.append(runtime.all_mean(step_loss))
        weights = consolidated_state_dict(engine)
        engine.destroy()
    timed_steps = config.sft.steps - config.warmup_steps
    samples = timed_steps * batch * accum * runtime.world_size
    tail = losses[-min(5, len(losses)) :]
    metrics = {
        "sft/steps": config.sft.steps,
        "sft/loss_first": losses[0],
        "sft/loss_final": sum(tail) / len(tail),
        **throughput(
            "sft",
            ctx.timer.seconds["sft"],
            samples,
            samples * ctx.sequence_len,
            timed_steps * train_flops(ctx.actor_shape, batch * accum, ctx.sequence_len),
        ),
    }
    return metrics, weights, losses
