"""Step 2, reward model: decoder backbone + scalar head, pairwise loss -log sigma(r_c - r_r).

Runs on the critic's engine settings (dropout included) with the RM learning rate. The score
of a sequence is the head's value at its last real token. Held-out pairwise accuracy = share
of pairs scored chosen > rejected. Returns the weights for the PPO critic and reward model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.flops import train_flops
from tunelab.pipeline.batching import (
    Sequences,
    eval_batches,
    last_token_index,
    position_ids,
)
from tunelab.pipeline.context import TrialContext
from tunelab.pipeline.models import (
    build_value_model,
    consolidated_state_dict,
    prepare_for_training,
    train_engine,
)
from tunelab.pipeline.supervised import stage_metrics, train_steps
from tunelab.pipeline.telemetry import throughput


def sequence_scores(engine, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] value at each sequence's last real token."""
    values = engine(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    return values.gather(1, last_token_index(mask).unsqueeze(1)).squeeze(1).float()


def _pair_scores(engine, chosen: Sequences, rejected: Sequences, rows, device):
    """Chosen and rejected scored in one forward pass of 2B rows, as DeepSpeed-Chat does."""
    chosen_ids, chosen_mask = chosen.rows(rows, device)
    rejected_ids, rejected_mask = rejected.rows(rows, device)
    scores = sequence_scores(
        engine, torch.cat([chosen_ids, rejected_ids]), torch.cat([chosen_mask, rejected_mask])
    )
    return scores[: len(rows)], scores[len(rows) :]


def pairwise_accuracy(ctx: TrialContext, engine) -> float:
    """Share of held-out pairs with score(chosen) > score(rejected), over all ranks."""
    with ctx.overhead("eval"):
        return _pairwise_accuracy(ctx, engine)


def _pairwise_accuracy(ctx: TrialContext, engine) -> float:
    runtime, data = ctx.runtime, ctx.data
    correct = counted_total = 0.0
    training = engine.training
    engine.eval()
    with torch.no_grad():
        for rows, counted in eval_batches(
            len(data.eval_chosen.ids),
            ctx.config.batch.train_micro,
            runtime.rank,
            runtime.world_size,
        ):
            chosen, rejected = _pair_scores(
                engine, data.eval_chosen, data.eval_rejected, rows, runtime.device
            )
            weight = torch.tensor(counted, dtype=torch.float32, device=chosen.device)
            correct += ((chosen > rejected).float() * weight).sum().item()
            counted_total += weight.sum().item()
    engine.train(training)
    return runtime.all_mean(correct) / max(runtime.all_mean(counted_total), 1e-9)


def run_rm(ctx: TrialContext):
    """Train for rm.steps optimizer steps; returns (metrics, state_dict on rank 0 / None,
    loss per step)."""
    config, runtime, data = ctx.config, ctx.runtime, ctx.data
    batch, accum = config.batch.train_micro, config.batch.grad_accum
    ds_config = ctx.ds_configs["rm"]
    with ctx.memory.stage("rm"):
        with ctx.memory.stage("setup"), ctx.overhead("setup"):
            # A new value head on a language model is where step 2 starts.
            model = build_value_model(ctx.critic_source, ctx.tokenizer, ds_config,
                                      config.critic.dropout, fresh_head=True)  # fmt: skip
            engine = train_engine(
                prepare_for_training(model, config.critic), ds_config, config.critic
            )
        ctx.record_engine("rm", engine, ctx.source_weights(ctx.critic_source))
        engine.train()
        accuracy_start = pairwise_accuracy(ctx, engine)

        def loss_of(rows: list[int]):
            chosen, rejected = _pair_scores(
                engine, data.chosen, data.rejected, rows, runtime.device
            )
            return -F.logsigmoid(chosen - rejected).mean()

        losses = train_steps(ctx, engine, "rm", config.rm.steps, len(data.chosen.ids),
                             data.chosen.ids.shape[1], config.seed + 1, loss_of)  # fmt: skip
        accuracy = pairwise_accuracy(ctx, engine)
        with ctx.overhead("handoff"):
            weights = consolidated_state_dict(engine)
        engine.destroy()
    timed = ctx.timed_steps("rm", config.rm.steps)
    pairs = len(timed) * batch * accum * runtime.world_size
    # A pair is two sequences through the backbone (no LM head).
    flops = len(timed) * train_flops(ctx.critic_shape, 2 * batch * accum, ctx.sequence_len,
                                     logits=0, adapters=ctx.adapters("rm"))  # fmt: skip
    metrics = {
        **stage_metrics(ctx, "rm", losses),
        "rm/eval_accuracy_start": accuracy_start,
        "rm/eval_accuracy": accuracy,
        "rm/eval_pairs": len(data.eval_chosen.ids),
        **throughput(
            "rm", ctx.timer.seconds("rm", timed), pairs, 2 * pairs * ctx.sequence_len, flops
        ),
    }
    return metrics, weights, losses
