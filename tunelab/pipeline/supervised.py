"""The optimizer-step loop the supervised stages (SFT and reward model) share."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tunelab.pipeline.batching import batch_indices
from tunelab.pipeline.context import TrialContext
from tunelab.pipeline.models import training_attention


def train_steps(
    ctx: TrialContext,
    engine,
    stage: str,
    steps: int,
    num_rows: int,
    tokens: int,
    seed: int,
    loss_of: Callable[[list[int]], torch.Tensor],
) -> list[float]:
    """`steps` optimizer steps of grad_accum micro-batches each, timed as phase `stage`;
    `loss_of(rows)` computes a micro-batch's loss over rows of `tokens` tokens (forward and
    backward run under training_attention). Returns the mean loss per step (all ranks). Steps whose
    optimizer step fp16 loss scaling skipped are noted in ctx.skipped."""
    runtime, batch = ctx.runtime, ctx.config.batch
    losses = []
    for step in range(steps):
        skipped_before = engine.skipped_steps
        with ctx.timed_phase(stage, step):
            step_loss = 0.0
            for micro in range(batch.grad_accum):
                rows = batch_indices(
                    num_rows, batch.train_micro, step * batch.grad_accum + micro, runtime.rank,
                    runtime.world_size, seed,
                )  # fmt: skip
                # Backward too: a checkpointed forward is recomputed there, with the same kernel.
                with training_attention(engine, tokens):
                    loss = loss_of(rows)
                    runtime.check_finite(loss, f"{stage} step {step}")
                    engine.backward(loss)
                ctx.record_states(stage, engine)
                engine.step()
                step_loss += loss.item() / batch.grad_accum
        ctx.note_skipped(stage, step, engine, skipped_before)
        losses.append(runtime.all_mean(step_loss))
        if engine.monitor.enabled:  # the opt-in tracker (config `tracker`): rank 0 writes
            engine.monitor.write_events([(f"{stage}/loss", losses[-1], step)])
    return losses


def stage_metrics(ctx: TrialContext, stage: str, losses: list[float]) -> dict[str, float]:
    """`<stage>/loss_first`, `<stage>/loss_final` (mean of the last five steps), the steps
    run, and those fp16 loss scaling skipped (kept out of throughput)."""
    tail = losses[-min(5, len(losses)) :]
    return {
        f"{stage}/steps": len(losses),
        f"{stage}/skipped_steps": len(ctx.skipped.get(stage, ())),
        f"{stage}/loss_first": losses[0],
        f"{stage}/loss_final": sum(tail) / len(tail),
    }
