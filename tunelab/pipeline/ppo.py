"""Step 3, PPO as in DeepSpeed-Chat: actor, frozen reference, critic, frozen reward model.

Each iteration: generate answers to prompts (phase `ppo_generate`), score them with the
reference, critic and reward model (`ppo_experience`, which DeepSpeed-Chat's end-to-end figure
leaves out), then PPO epochs over the experience (`ppo_train`). The maths lives in ppo_math.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.data import gold_reward
from tunelab.flops import forward_flops, generation_flops, train_flops
from tunelab.metrics import RUNNING, recent_mean
from tunelab.pipeline import ppo_math
from tunelab.pipeline.batching import batch_indices, eval_batches, position_ids
from tunelab.pipeline.context import TrialContext
from tunelab.pipeline.decoding import Decoding, decode, generate_only_reasons
from tunelab.pipeline.models import (
    build_causal_lm,
    build_value_model,
    frozen_engine,
    generation_weights,
    is_zero3,
    load_weights,
    prepare_for_training,
    train_engine,
    training_attention,
)
from tunelab.pipeline.rm import pairwise_accuracy, sequence_scores
from tunelab.pipeline.telemetry import throughput
from tunelab.stagecache import START_REUSED, read_start, save_start

log = logging.getLogger("tunelab")


@dataclass(frozen=True)
class Experience:
    """One generated batch and everything PPO needs from it (B rows, T = P + A columns)."""

    seq: torch.Tensor  # [B, T] prompt (left-padded) + answer (right-padded)
    attention_mask: torch.Tensor  # [B, T]
    answer_mask: torch.Tensor  # [B, A] generated tokens up to and including eos
    logprobs: torch.Tensor  # [B, A] actor, at generation time
    ref_logprobs: torch.Tensor  # [B, A]
    values: torch.Tensor  # [B, A] critic, at generation time
    advantages: torch.Tensor  # [B, A]
    returns: torch.Tensor  # [B, A]
    scores: torch.Tensor  # [B] reward-model score
    gold: torch.Tensor | None  # [B] gold reward (synthetic task only)

    def rows(self, start: int, stop: int) -> Experience:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return Experience(
            **{k: v[start:stop] if v is not None else None for k, v in fields.items()}
        )


def _concat(experiences: list[Experience]) -> Experience:
    def cat(name):
        parts = [getattr(e, name) for e in experiences]
        return None if parts[0] is None else torch.cat(parts)

    return Experience(**{name: cat(name) for name in Experience.__dataclass_fields__})


@contextlib.contextmanager
def own_random_stream(seed: int, device: torch.device) -> Iterator[None]:
    """Draws inside come from `seed`; outside, torch's stream (CPU, and `device` on a GPU) goes
    on as if they had not happened. Evaluation runs in one, so what training draws cannot
    change what evaluation draws, nor the reverse."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


SAMPLES = 3  # decoded answers of the end-of-PPO evaluation kept in metrics.json ("samples")


class PPOTrainer:
    """The four engines and the three phases of a PPO iteration."""

    def __init__(self, ctx: TrialContext, sft_weights, rm_weights) -> None:
        self.ctx = ctx
        config = ctx.config
        self.prompt_len = config.ppo.max_prompt_len
        self.answer_len = config.ppo.max_answer_len
        tokenizer = ctx.tokenizer
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.synthetic = config.data.source == "synthetic"
        self.actor = self._init_actor(sft_weights)
        self.reference = self._init_reference(sft_weights)
        self.critic = self._init_critic(rm_weights)
        self.reward = self._init_reward(rm_weights)
        self.decoding = self._decoding()
        ctx.record_states("reference", self.reference)
        ctx.record_states("reward", self.reward)

    def _actor_model(self, ds_config: dict, weights, dropout: float | None, role: str):
        """The SFT weights (trained here: rank 0's hand-off), or models.actor as given."""
        ctx = self.ctx
        trained = ctx.config.sft.steps > 0
        model = build_causal_lm(ctx.actor_source, ctx.tokenizer, ds_config, dropout,
                                with_weights=not trained)  # fmt: skip
        if trained:
            load_weights(model, weights, f"{role} from the SFT weights")
            return model, "SFT hand-off (trained in this trial)"
        return model, ctx.source_weights(ctx.actor_source)

    def _value_model(self, ds_config: dict, weights, dropout: float | None, role: str):
        """The reward model's weights (trained here: rank 0's hand-off), or models.critic as
        given, which must carry a value head unless models.fresh_value_head."""
        ctx = self.ctx
        trained = ctx.config.rm.steps > 0
        model = build_value_model(
            ctx.critic_source, ctx.tokenizer, ds_config, dropout, with_weights=not trained,
            fresh_head=ctx.config.models.fresh_value_head,
        )  # fmt: skip
        if trained:
            load_weights(model, weights, f"{role} from the reward-model weights")
            return model, "reward-model hand-off (trained in this trial)"
        return model, ctx.source_weights(ctx.critic_source)

    def _init_actor(self, weights):
        ctx, ds_config = self.ctx, self.ctx.ds_configs["actor"]
        model, source = self._actor_model(ds_config, weights, ctx.config.actor.dropout, "actor")
        engine = train_engine(
            prepare_for_training(model, ctx.config.actor), ds_config, ctx.config.actor
        )
        ctx.record_engine("actor", engine, source)
        return engine

    def _init_reference(self, weights):
        ds_config = self.ctx.ds_configs["reference"]
        model, source = self._actor_model(ds_config, weights, None, "reference")
        engine = frozen_engine(model, ds_config)
        self.ctx.record_engine("reference", engine, source)
        return engine

    def _init_critic(self, weights):
        ctx, ds_config = self.ctx, self.ctx.ds_configs["critic"]
        model, source = self._value_model(ds_config, weights, ctx.config.critic.dropout, "critic")
        engine = train_engine(
            prepare_for_training(model, ctx.config.critic), ds_config, ctx.config.critic
        )
        ctx.record_engine("critic", engine, source)
        return engine

    def _init_reward(self, weights):
        ds_config = self.ctx.ds_configs["reward"]
        model, source = self._value_model(ds_config, weights, None, "reward model")
        engine = frozen_engine(model, ds_config)
        self.ctx.record_engine("reward", engine, source)
        return engine

    def _decoding(self) -> Decoding:
        ppo = self.ctx.config.ppo
        reasons = generate_only_reasons(self.actor.module)
        if reasons:
            log.info("rank %d: PPO decodes through transformers' generate: the actor's %s",
                     self.ctx.runtime.rank, "; ".join(reasons))  # fmt: skip
        return Decoding(
            max_new=self.answer_len,
            min_new=ppo.min_answer_len,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            temperature=ppo.temperature if ppo.decoding == "sample" else None,
            synced=is_zero3(self.actor) and ppo.zero3_generation == "per_layer",
            through_generate=bool(reasons),
        )

    def close(self) -> None:
        for engine in (self.actor, self.reference, self.critic, self.reward):
            engine.destroy()

    def set_training(self, training: bool) -> None:
        """Actor and critic in train mode for PPO updates, eval mode (no dropout) while
        making experience, as DeepSpeed-Chat's trainer switches them."""
        for engine in (self.actor, self.critic):
            engine.train(training)

    # -- generation ---------------------------------------------------------------------------

    def generate(self, prompt_ids, prompt_mask):
        """Answers to prompts (see decoding.decode); returns (seq [B, T], attention_mask [B, T],
        answer_mask [B, A], new tokens per row). Under ZeRO-3 see models.generation_weights
        for how the actor's parameters reach every rank (ppo.zero3_generation)."""
        with torch.no_grad(), generation_weights(self.actor, self.ctx.config.ppo.zero3_generation):
            output = decode(self.actor.module, prompt_ids, prompt_mask, self.decoding)
        new_tokens = output.shape[1] - self.prompt_len
        answers = output[:, self.prompt_len :]
        if new_tokens < self.answer_len:
            padding = answers.new_full(
                (answers.shape[0], self.answer_len - new_tokens), self.pad_id
            )
            answers = torch.cat([answers, padding], dim=1)
        answer_mask = ppo_math.answer_mask(answers, self.eos_id)
        seq = torch.cat([prompt_ids, answers], dim=1)
        return seq, torch.cat([prompt_mask, answer_mask], dim=1), answer_mask, new_tokens

    # -- experience ---------------------------------------------------------------------------

    # Experience and training score sequences with one attention kernel (training_attention):
    # a difference of kernels cannot move the start's KL from 0 nor a first ratio from 1.
    def _answer_logprobs(self, engine, seq, mask):
        """[B, A] log-probabilities of the answer tokens; logits only for answer positions."""
        with training_attention(engine, seq.shape[1]):
            logits = engine(
                input_ids=seq,
                attention_mask=mask,
                position_ids=position_ids(mask),
                use_cache=False,
                logits_to_keep=self.answer_len + 1,
            ).logits[:, :-1]
        return ppo_math.token_logprobs(
            logits, seq[:, self.prompt_len :], self.ctx.config.ppo.temperature
        )

    def _answer_values(self, engine, seq, mask):
        """[B, A] critic values of the states before each answer token."""
        with training_attention(engine, seq.shape[1]):
            values = engine(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask))
        return values[:, self.prompt_len - 1 : -1].float()

    def gold_rewards(self, seq, answer_mask) -> torch.Tensor | None:
        if not self.synthetic:
            return None
        answers = (seq[:, self.prompt_len :] * answer_mask).tolist()
        texts = self.ctx.tokenizer.batch_decode(answers, skip_special_tokens=True)
        return torch.tensor([gold_reward(text) for text in texts])

    def make_experience(self, seq, mask, answer_mask) -> Experience:
        ppo = self.ctx.config.ppo
        with torch.no_grad():
            logprobs = self._answer_logprobs(self.actor, seq, mask)
            ref_logprobs = self._answer_logprobs(self.reference, seq, mask)
            values = self._answer_values(self.critic, seq, mask)
            scores = sequence_scores(self.reward, seq, mask)
        rewards = ppo_math.kl_penalized_rewards(
            logprobs, ref_logprobs, scores, answer_mask, ppo.kl_coef, ppo.reward_clip
        )
        advantages, returns = ppo_math.gae_advantages(
            values, rewards, answer_mask, ppo.gamma, ppo.lam
        )
        return Experience(
            seq,
            mask,
            answer_mask,
            logprobs,
            ref_logprobs,
            values,
            advantages,
            returns,
            scores,
            self.gold_rewards(seq, answer_mask),
        )

    # -- training -----------------------------------------------------------------------------

    def train(self, experience: Experience, step: int) -> dict[str, float]:
        """ppo.epochs passes over the experience in training micro-batches (actor, then critic).
        A step in which either optimizer skipped (fp16 overflow) is noted in ctx.skipped."""
        ppo, runtime = self.ctx.config.ppo, self.ctx.runtime
        skipped_before = (self.actor.skipped_steps, self.critic.skipped_steps)
        micro, tokens = self.ctx.config.batch.train_micro, experience.seq.shape[1]
        stats = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0}
        count = 0
        for _ in range(ppo.epochs):
            for start in range(0, len(experience.seq), micro):
                batch = experience.rows(start, start + micro)
                logprobs = self._answer_logprobs(self.actor, batch.seq, batch.attention_mask)
                actor_loss, clip_fraction = ppo_math.policy_loss(
                    logprobs, batch.logprobs, batch.advantages, batch.answer_mask, ppo.clip_range
                )
                runtime.check_finite(actor_loss, f"ppo step {step} actor")
                # A checkpointed forward is recomputed in backward, with the same kernel.
                with training_attention(self.actor, tokens):
                    self.actor.backward(actor_loss)
                self.ctx.record_states("actor", self.actor)
                self.actor.step()
                values = self._answer_values(self.critic, batch.seq, batch.attention_mask)
                critic_loss = ppo_math.value_loss(
                    values, batch.values, batch.returns, batch.answer_mask, ppo.value_clip_range
                )
                runtime.check_finite(critic_loss, f"ppo step {step} critic")
                with training_attention(self.critic, tokens):
                    self.critic.backward(critic_loss)
                self.ctx.record_states("critic", self.critic)
                self.critic.step()
                stats["policy_loss"] += actor_loss.item()
                stats["value_loss"] += critic_loss.item()
                stats["clip_fraction"] += clip_fraction.item()
                count += 1
        self.ctx.note_skipped("ppo_actor", step, self.actor, skipped_before[0])
        self.ctx.note_skipped("ppo_critic", step, self.critic, skipped_before[1])
        for role in ("actor", "critic"):
            if step in self.ctx.skipped.get(f"ppo_{role}", ()):
                self.ctx.skipped.setdefault("ppo", set()).add(step)
        return {name: value / count for name, value in stats.items()}

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, samples: int = 0) -> dict:
        """Mean reward-model score and gold reward of answers to the held-out prompts, and
        `samples` of them decoded (this rank's first rows): {prompt, answer, gold, score}.

        Sampling draws from its own stream, seeded alike for every evaluation (eval_seed): the
        start and end of a trial, and every trial of a study, answer the same prompts with the
        same draws (common random numbers), so their difference is the policy's, not luck's."""
        ctx, config = self.ctx, self.ctx.config
        self.set_training(False)
        prompts, runtime = ctx.data.eval_prompts, ctx.runtime
        seed = config.seed + 4 if config.eval_seed is None else config.eval_seed
        totals = {"score": 0.0, "gold": 0.0, "count": 0.0}
        decoded: list[dict] = []
        batches = eval_batches(
            len(prompts.ids), config.batch.generation_micro, runtime.rank, runtime.world_size
        )
        with own_random_stream(seed + runtime.rank, runtime.device):
            for rows, counted in batches:
                seq, mask, answer_mask, _ = self.generate(*prompts.rows(rows, runtime.device))
                with torch.no_grad():
                    scores = sequence_scores(self.reward, seq, mask).float().cpu()
                weight = torch.tensor(counted, dtype=torch.float32)
                gold = self.gold_rewards(seq, answer_mask)
                totals["score"] += (scores * weight).sum().item()
                totals["gold"] += 0.0 if gold is None else (gold * weight).sum().item()
                totals["count"] += weight.sum().item()
                wanted = min(samples - len(decoded), sum(counted))
                decoded += self._decoded(seq[:wanted], answer_mask[:wanted], scores, gold)
        means = {name: runtime.all_mean(value) for name, value in totals.items()}
        result = {"score": means["score"] / means["count"], "samples": decoded}
        if self.synthetic:
            result["gold"] = means["gold"] / means["count"]
        return result

    def _decoded(self, seq, answer_mask, scores, gold) -> list[dict]:
        """Prompt and answer texts of the rows of `seq` with their score and gold reward."""
        decode = self.ctx.tokenizer.decode
        return [
            {
                "prompt": decode(row[: self.prompt_len].tolist(), skip_special_tokens=True),
                "answer": decode(
                    (row[self.prompt_len :] * mask).tolist(), skip_special_tokens=True
                ),
                "gold": None if gold is None else gold[i].item(),
                "score": scores[i].item(),
            }
            for i, (row, mask) in enumerate(zip(seq, answer_mask, strict=True))
        ]


def run_ppo(ctx: TrialContext, handoff: dict, start_plan: dict | None = None):
    """PPO for ppo.steps iterations from the SFT and RM weights in `handoff` (emptied once the
    engines are built, so host memory is freed); returns (metrics, per-step series, decoded
    samples of the end evaluation). `start_plan` (the stage plan's START entry) loads the
    start evaluation from the stage cache, or saves it there."""
    config, runtime, timer = ctx.config, ctx.runtime, ctx.timer
    ppo, batch = config.ppo, config.batch
    # PPO's random stream starts from the seed, not from what SFT and RM drew: a trial whose
    # stages come from the stage cache runs the same PPO as the one that trained them.
    torch.manual_seed(config.seed + 3)
    with ctx.memory.stage("setup"), ctx.overhead("setup"):
        trainer = PPOTrainer(ctx, handoff.pop("sft", None), handoff.pop("rm", None))
    given_rm = {}
    if config.rm.steps == 0:  # a given reward model: does it tell held-out pairs apart?
        given_rm = {
            "rm/eval_accuracy": pairwise_accuracy(ctx, trainer.reward),
            "rm/eval_pairs": len(ctx.data.eval_chosen.ids),
        }
    start_reused = start_plan is not None and _start_cached(start_plan, runtime)
    if start_reused:
        start = read_start(Path(start_plan["path"]))
        if runtime.is_main:
            log.info("PPO's start read from the stage cache (%s)", start_plan["path"])
    else:
        with ctx.memory.stage("ppo_eval"), ctx.overhead("eval"):
            start = trainer.evaluate()
        if start_plan and runtime.is_main:
            figures = {name: value for name, value in start.items() if name != "samples"}
            try:  # the cache saves later trials an evaluation; this one needs none of it
                save_start(Path(start_plan["path"]), figures)
            except OSError as exc:
                log.warning("PPO's start not kept in the stage cache (%s)", exc)
    prompts = ctx.data.prompts
    series: dict[str, list[float]] = {}
    # This rank's tokens per step: "generated" = answer width x rows (padding after an early
    # eos included), "answer" = answer tokens up to eos, "sequence" = non-pad prompt + answer.
    tokens: dict[str, list[int]] = {"generated": [], "answer": [], "sequence": []}
    for step in range(config.ppo.steps):
        with ctx.timed_phase("ppo_step", step):
            trainer.set_training(False)
            experiences = []
            for counts in tokens.values():
                counts.append(0)
            for gen_batch in range(ppo.generation_batches):
                rows = batch_indices(
                    len(prompts.ids),
                    batch.generation_micro,
                    step * ppo.generation_batches + gen_batch,
                    runtime.rank,
                    runtime.world_size,
                    config.seed + 2,
                )
                with ctx.timed_phase("ppo_generate", step), ctx.memory.stage("ppo_generate"):
                    seq, mask, answer_mask, new_tokens = trainer.generate(
                        *prompts.rows(rows, runtime.device)
                    )
                with ctx.timed_phase("ppo_experience", step), ctx.memory.stage("ppo_experience"):
                    experiences.append(trainer.make_experience(seq, mask, answer_mask))
                tokens["generated"][-1] += new_tokens * len(rows)
                tokens["answer"][-1] += int(answer_mask.sum().item())
                tokens["sequence"][-1] += int(mask.sum().item())
            experience = _concat(experiences)
            trainer.set_training(True)
            with ctx.timed_phase("ppo_train", step), ctx.memory.stage("ppo_train"):
                stats = trainer.train(experience, step)
        record = {
            "ppo/score": runtime.all_mean(experience.scores.mean().item()),
            "ppo/kl": runtime.all_mean(
                ppo_math.sequence_kl(
                    experience.logprobs, experience.ref_logprobs, experience.answer_mask
                ).item()
            ),
            "ppo/answer_tokens": runtime.all_mean(
                experience.answer_mask.sum(1).float().mean().item()
            ),
            **{f"ppo/{name}": runtime.all_mean(value) for name, value in stats.items()},
        }
        if experience.gold is not None:
            record["ppo/gold"] = runtime.all_mean(experience.gold.mean().item())
        for name, value in record.items():
            series.setdefault(name, []).append(value)
        if config.tracker != "none":  # the actor's DeepSpeed monitor (rank 0 writes)
            trainer.actor.monitor.write_events([(name, value, step) for name, value
                                                in record.items()])  # fmt: skip
        progress = {f"{name}_recent": recent_mean(series[name])
                    for name in ("ppo/score", "ppo/gold", "ppo/kl") if name in series}  # fmt: skip
        # Peaks so far, max over ranks as the final metrics are (constraint stop lines).
        peaks = runtime.all_max(ctx.memory.peaks())
        progress.update({RUNNING[name]: value for name, value in peaks.items()})
        if start_reused:  # the parent counts it for a trial it stops, which leaves no metrics
            progress[START_REUSED] = 1
        timed = [s for s in range(config.warmup_steps, step + 1)
                 if s not in ctx.skipped.get("ppo", ())]  # fmt: skip
        if timed:
            rows_done = len(timed) * batch.generation_micro * ppo.generation_batches
            progress["perf/ppo_e2e_tokens_per_s"] = (
                rows_done
                * runtime.world_size
                * ctx.sequence_len
                / timer.seconds("ppo_step", timed)
            )
        ctx.progress.write("ppo", step, progress)
    with ctx.memory.stage("ppo_eval"), ctx.overhead("eval"):
        end = trainer.evaluate(samples=SAMPLES)
    trainer.close()
    for phase in ("ppo_generate", "ppo_experience", "ppo_train", "ppo_step"):
        series[f"time/{phase}_s"] = timer.series(phase)
    timed = ctx.timed_steps("ppo", ppo.steps)
    timed_tokens = {name: sum(counts[s] for s in timed) for name, counts in tokens.items()}
    metrics = {**given_rm, **_ppo_metrics(ctx, timed, start, end, series, timed_tokens)}
    if start_reused:
        metrics[START_REUSED] = 1
    return metrics, series, end["samples"]


def _start_cached(start_plan: dict, runtime) -> bool:
    """Whether PPO's start is read from the stage cache: the plan says so, or the entry was
    written since the plan was made (by the trial this one waited for while it trained SFT and
    RM). Every rank answers alike (a rank that evaluates while another reads would wait in the
    evaluation's collectives): any rank's sight of the entry counts, and it is never removed."""
    if start_plan["action"] == "load":
        return True
    seen = float(Path(start_plan["path"]).is_file())
    return runtime.all_max({"seen": seen})["seen"] > 0


def nonpad_throughput(seconds: dict[str, float], answer_tokens: int, sequence_tokens: int):
    """`perf/<phase>_nonpad_tokens_per_s` of PPO's phases from their `seconds` (training's per
    epoch: each epoch goes over the same tokens): answer tokens up to eos for generation, what
    the phases read of prompt and answer without padding for the others."""
    return {
        f"perf/{phase}_nonpad_tokens_per_s": (
            answer_tokens if phase == "ppo_generate" else sequence_tokens
        )
        / max(time, 1e-9)
        for phase, time in seconds.items()
    }


def _ppo_metrics(ctx: TrialContext, timed: list[int], start, end, series,
                 tokens: dict[str, int]) -> dict:  # fmt: skip
    """Figures over the `timed` steps (after warm-up, none skipped by fp16 loss scaling);
    `tokens`: this rank's token counts over them (see run_ppo)."""
    config, timer, world = ctx.config, ctx.timer, ctx.runtime.world_size
    ppo, batch = config.ppo, config.batch
    steps = len(timed)
    rows_per_rank = batch.generation_micro * ppo.generation_batches  # per rank per step
    seq_len, prompt_len = ctx.sequence_len, ppo.max_prompt_len
    gen_calls = steps * ppo.generation_batches
    new_per_call = tokens["generated"] / max(gen_calls * batch.generation_micro, 1)
    actor, critic = ctx.actor_shape, ctx.critic_shape
    # LoRA adapters run in forwards too (a frozen reference or reward model has none).
    actor_adapters, critic_adapters = ctx.adapters("actor"), ctx.adapters("critic")
    gen_flops = gen_calls * generation_flops(
        actor, batch.generation_micro, prompt_len, round(new_per_call), actor_adapters or 0
    )
    # Actor and reference compute logits for the answer only (logits_to_keep = A + 1);
    # critic and reward model have no LM head.
    logits = ppo.max_answer_len + 1
    exp_flops = steps * (
        forward_flops(actor, rows_per_rank, seq_len, logits, actor_adapters or 0)
        + forward_flops(actor, rows_per_rank, seq_len, logits)
        + forward_flops(critic, rows_per_rank, seq_len, 0, critic_adapters or 0)
        + forward_flops(critic, rows_per_rank, seq_len, 0)
    )
    train = (
        steps
        * ppo.epochs
        * (
            train_flops(actor, rows_per_rank, seq_len, logits, actor_adapters)
            + train_flops(critic, rows_per_rank, seq_len, 0, critic_adapters)
        )
    )
    samples = steps * rows_per_rank * world
    # Summed over ranks: padded generated tokens, and the non-pad ones (ranks' answers differ).
    total = {name: round(ctx.runtime.all_mean(count) * world) for name, count in tokens.items()}
    gen_s, exp_s, train_s, step_s = (
        timer.seconds(n, timed)
        for n in ("ppo_generate", "ppo_experience", "ppo_train", "ppo_step")
    )
    tail = max(1, len(series["ppo/kl"]) // 4)  # "final" = mean over the last quarter of steps

    def final(name):
        return sum(series[name][-tail:]) / tail

    metrics = {
        "ppo/steps": ppo.steps,
        "ppo/timed_steps": steps,
        "ppo/actor_skipped_steps": len(ctx.skipped.get("ppo_actor", ())),
        "ppo/critic_skipped_steps": len(ctx.skipped.get("ppo_critic", ())),
        "ppo/score_start": start["score"],
        "ppo/score_end": end["score"],
        "ppo/score_gain": end["score"] - start["score"],
        "ppo/kl_final": final("ppo/kl"),
        "ppo/clip_fraction": sum(series["ppo/clip_fraction"]) / len(series["ppo/clip_fraction"]),
        "ppo/value_loss_final": final("ppo/value_loss"),
        "ppo/policy_loss_final": final("ppo/policy_loss"),
        "ppo/answer_tokens_mean": sum(series["ppo/answer_tokens"])
        / len(series["ppo/answer_tokens"]),
        **throughput("ppo_generate", gen_s, samples, total["generated"], gen_flops),
        "perf/ppo_generate_latency_s": gen_s / max(gen_calls, 1),
        "perf/ppo_generate_per_token_latency_s": gen_s / max(gen_calls * new_per_call, 1e-9),
        **throughput("ppo_experience", exp_s, samples, samples * seq_len, exp_flops),
        **throughput(
            "ppo_train", train_s, samples * ppo.epochs, samples * ppo.epochs * seq_len, train
        ),
        **throughput("ppo_e2e", step_s, samples, samples * seq_len, gen_flops + exp_flops + train),
        # Tokens that are not padding: answers up to eos (generation), prompt + answer (others).
        **nonpad_throughput(
            {
                "ppo_generate": gen_s,
                "ppo_experience": exp_s,
                "ppo_train": train_s / ppo.epochs,
                "ppo_e2e": step_s,
            },
            total["answer"],
            total["sequence"],
        ),
        "time/ppo_step_s": step_s / steps,
        # DeepSpeed-Chat's "End-to-End" is generation + training only.
        "time/ppo_dschat_e2e_s": (gen_s + train_s) / steps,
    }
    if "gold" in start:
        metrics.update(
            {
                "ppo/gold_start": start["gold"],
                "ppo/gold_end": end["gold"],
                "ppo/gold_gain": end["gold"] - start["gold"],
            }
        )
    return metrics
