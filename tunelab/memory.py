"""Predicted memory per rank for every RLHF stage, before anything is launched (pure Python).

Model states follow the ZeRO paper (Rajbhandari et al. 2020): with Psi parameters in 16-bit
and Adam, 2Psi params + 2Psi grads + K*Psi optimizer states (K = 12: fp32 master, momentum,
variance); stage 1 partitions the optimizer states over N ranks, stage 2 also the gradients,
stage 3 also the parameters. The terms are laid out as DeepSpeed 0.19 allocates them, checked
against live engines (tests/test_memory_measured.py):

- stages 1-2 keep only this rank's gradient partition between backward and step; stage 3 keeps
  parameters below `stage3_param_persistence_threshold` elements whole on every rank;
- optimizer offload moves the fp32 master, its fp32 gradient and the moments to the host,
  parameter offload (ZeRO-3) the parameter partitions;
- the fp32 gradient of the master weights lives only inside optimizer.step (`step_transient`);
  with it, ZeRO-2 matches DeepSpeed's estimate_zero2_model_states_mem_needs (2P + 18P/N).

Activations per decoder layer follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", eq. 2): s*b*h*(34 + 5*a*s/h) bytes in 16-bit
without recomputation. transformers runs attention through SDPA, whose fused kernels never
store the a*s*s score matrices, so the 5*a*s/h term is dropped (as in the paper's selective
recomputation, 34*s*b*h); `eager_attention=True` keeps it. Full recomputation keeps 2*s*b*h per
layer (the layer inputs). The generation KV cache is 2 * layers * batch * tokens * kv_width *
bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from tunelab.config import EngineConfig, TrialConfig
from tunelab.presets import ModelShape

PERSISTENCE_THRESHOLD = 10_000  # stage3_param_persistence_threshold in dsconfig (DS-Chat's)
STAGE3_MAX_LIVE = 30_000_000  # stage3_max_live_parameters / prefetch bucket (DS-Chat's)
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
STAGES = ("sft", "rm", "ppo_generate", "ppo_experience", "ppo_train")


@dataclass(frozen=True)
class Split:
    """Bytes on the accelerator (`device`) and in CPU memory (`host`)."""

    device: int = 0
    host: int = 0

    def __add__(self, other: Split) -> Split:
        return Split(self.device + other.device, self.host + other.host)

    @property
    def total(self) -> int:
        return self.device + self.host

    @staticmethod
    def at(nbytes: float, host: bool) -> Split:
        return Split(0, math.ceil(nbytes)) if host else Split(math.ceil(nbytes), 0)


@dataclass(frozen=True)
class EngineStates:
    """Model states of one DeepSpeed engine on one rank."""

    params: Split = Split()
    grads: Split = Split()
    optimizer: Split = Split()  # fp32 master weights + Adam moments
    buffers: Split = Split()  # ZeRO-3 reduce bucket, offload staging buffers
    step_transient: Split = Split()  # fp32 gradients alive only inside optimizer.step

    @property
    def model_states(self) -> Split:
        """params + grads + optimizer: what the ZeRO paper counts (and tests compare)."""
        return self.params + self.grads + self.optimizer

    @property
    def resident(self) -> Split:
        return self.model_states + self.buffers

    def to_dict(self) -> dict[str, Any]:
        result = {f.name: vars(getattr(self, f.name)) for f in fields(self)}
        result["model_states"] = vars(self.model_states)
        return result


def _lora_targets(shape: ModelShape, modules: tuple[str, ...]) -> list[tuple[int, int]]:
    """(in, out) of every linear peft wraps: all of them for "all-linear" (the LM head is
    never wrapped), else those whose name is listed."""
    per_layer = shape.layer_linears()
    extra = shape.extra_linears()
    if modules != ("all-linear",):
        per_layer = [linear for linear in per_layer if linear[0] in modules]
        extra = [linear for linear in extra if linear[0] in modules]
    return [(i, o) for _, i, o in per_layer] * shape.num_layers + [(i, o) for _, i, o in extra]


def engine_tensors(shape: ModelShape, engine: EngineConfig | None, value_head: bool):
    """(trainable, frozen) parameter tensor sizes of one role's model.

    `engine=None` for a frozen model. LoRA adds r*in (A) and out*r (B) per wrapped linear and
    freezes the base; a value head adds one trainable vector.
    """
    base = shape.param_tensors(lm_head=not value_head)
    head = [shape.output_dim] if value_head else []
    if engine is None:
        return [], base + head
    if engine.lora_rank > 0:
        r = engine.lora_rank
        adapters = [
            t for i, o in _lora_targets(shape, engine.lora_modules) for t in (r * i, o * r)
        ]
        return adapters + head, base
    return base + head, []


def engine_states(
    trainable: list[int],
    frozen: list[int],
    *,
    zero_stage: int,
    ranks: int,
    precision: str,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    reduce_bucket: int = REDUCE_BUCKET,
) -> EngineStates:
    """Model states per rank of one engine (no optimizer when `trainable` is empty)."""
    width = 4 if precision == "fp32" else 2  # bytes per parameter and gradient element
    n = ranks
    t_count = sum(trainable)
    p_count = t_count + sum(frozen)
    if zero_stage == 3:
        # Small tensors stay whole on every rank besides their partition (one rank: the same).
        persistent = sum(t for t in trainable + frozen if t <= PERSISTENCE_THRESHOLD)
        whole = width * persistent if n > 1 else 0
        params = Split.at(width * p_count / n, offload_params) + Split.at(whole, False)
    else:
        params = Split.at(width * p_count, False)
    if not trainable:
        return EngineStates(params=params)

    # fp32 master copy (4 bytes) + Adam momentum and variance (8); plain fp32 at stage 0 trains
    # the module's own parameters and keeps no copy.
    optimizer_width = 8 if precision == "fp32" and zero_stage == 0 else 12
    if zero_stage == 0:
        grads = Split.at(width * t_count, False)
        optimizer = Split.at(optimizer_width * t_count, False)
        transient = Split.at(4 * t_count if precision != "fp32" else 0, False)
        return EngineStates(params, grads, optimizer, Split(), transient)

    share = t_count / n
    optimizer = Split.at(optimizer_width * share, offload_optimizer)
    if offload_optimizer:
        # Gradients are copied into the host's fp32 partition during backward.
        grads = Split.at(4 * share, True)
        if zero_stage == 3:
            grads += Split.at(width * share, False)  # 16-bit partition kept on the device
            buffers = Split.at(width * reduce_bucket, False)
        else:
            largest = max(trainable)
            # bf16 copy of the partition and two staging buffers of the largest tensor.
            buffers = Split.at(width * share + 2 * width * largest, False)
        return EngineStates(params, grads, optimizer, buffers, Split())
    grads = Split.at(width * share, False)
    buffers = Split.at(width * reduce_bucket, False) if zero_stage == 3 else Split()
    return EngineStates(params, grads, optimizer, buffers, Split.at(4 * share, False))


def _role_states(config: TrialConfig, shape: ModelShape, engine: EngineConfig, value_head: bool):
    trainable, frozen = engine_tensors(shape, engine, value_head)
    return engine_states(
        trainable, frozen, zero_stage=engine.zero_stage, ranks=config.ranks,
        precision=config.precision, offload_optimizer=engine.offload_optimizer == "cpu",
        offload_params=engine.offload_params == "cpu",
    )  # fmt: skip


def _frozen_states(config: TrialConfig, shape: ModelShape, follows: EngineConfig, offload: bool,
                   value_head: bool) -> EngineStates:  # fmt: skip
    _, frozen = engine_tensors(shape, None, value_head)
    return engine_states(
        [], frozen, zero_stage=3 if follows.zero_stage == 3 else 0, ranks=config.ranks,
        precision=config.precision, offload_params=offload,
    )  # fmt: skip


def activation_bytes(
    shape: ModelShape,
    batch: int,
    seq: int,
    checkpointing: bool,
    precision: str,
    eager_attention: bool = False,
) -> int:
    """Activations kept for backward over all layers (Korthikanti et al. 2022, eq. 2).

    16-bit: s*b*h*34 per layer (+ 5*a*s*s*b for eager attention's stored scores) without
    recomputation; 2*s*b*h (the layer input) with full recomputation, plus one layer's worth
    recomputed during backward. fp32 doubles.
    """
    s, b, h, a = seq, batch, shape.hidden_size, shape.num_heads
    per_layer = s * b * h * (34 + (5 * a * s / h if eager_attention else 0))
    if checkpointing:
        total = 2 * s * b * h * shape.num_layers + per_layer
    else:
        total = per_layer * shape.num_layers
    return math.ceil(total * (2 if precision == "fp32" else 1))


def logits_bytes(shape: ModelShape, batch: int, positions: int, backward: bool) -> int:
    """fp32 logits over the vocabulary (loss and log-probabilities), and their gradient."""
    return batch * positions * shape.vocab_size * 4 * (2 if backward else 1)


def kv_cache_bytes(shape: ModelShape, batch: int, tokens: int, precision: str) -> int:
    """Keys and values of every layer for `tokens` positions: 2 * L * b * t * kv_width * bytes."""
    width = 4 if precision == "fp32" else 2
    return 2 * shape.num_layers * batch * tokens * shape.kv_dim * width


def gather_bytes(shape: ModelShape, engine: EngineConfig, precision: str, ranks: int) -> int:
    """ZeRO-3 parameters gathered while computing: up to stage3_max_live_parameters at once."""
    if engine.zero_stage != 3:
        return 0
    width = 4 if precision == "fp32" else 2
    total = shape.num_params()
    return math.ceil(width * min(total, STAGE3_MAX_LIVE) * (1 - 1 / ranks))


@dataclass(frozen=True)
class StageMemory:
    """Everything one rank holds at the peak of one stage."""

    engines: dict[str, EngineStates]
    transient: dict[str, int] = field(default_factory=dict)  # device bytes at the peak
    host_transient: dict[str, int] = field(default_factory=dict)
    stepping: tuple[str, ...] = ()  # engines whose optimizer steps here (one at a time)

    def _step(self, place: str) -> int:
        return max(
            (getattr(self.engines[r].step_transient, place) for r in self.stepping), default=0
        )

    @property
    def device_peak(self) -> int:
        resident = sum(e.resident.device for e in self.engines.values())
        return resident + self._step("device") + sum(self.transient.values())

    @property
    def host_peak(self) -> int:
        resident = sum(e.resident.host for e in self.engines.values())
        return resident + self._step("host") + sum(self.host_transient.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "engines": {role: states.to_dict() for role, states in self.engines.items()},
            "transient": dict(self.transient),
            "host_transient": dict(self.host_transient),
            "device_peak": self.device_peak,
            "host_peak": self.host_peak,
        }


@dataclass(frozen=True)
class MemoryPrediction:
    ranks: int
    stages: dict[str, StageMemory]

    @property
    def device_peak(self) -> int:
        return max(stage.device_peak for stage in self.stages.values())

    @property
    def host_peak(self) -> int:
        return max(stage.host_peak for stage in self.stages.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "ranks": self.ranks,
            "device_peak": self.device_peak,
            "host_peak": self.host_peak,
            "stages": {name: stage.to_dict() for name, stage in self.stages.items()},
        }

    def flat_metrics(self) -> dict[str, int]:
        """`mem/<stage>/predicted_*` next to the measured `mem/<stage>/peak_*` of a trial."""
        metrics = {
            "mem/predicted_device_peak_bytes": self.device_peak,
            "mem/predicted_host_peak_bytes": self.host_peak,
        }
        for name, stage in self.stages.items():
            metrics[f"mem/{name}/predicted_device_peak_bytes"] = stage.device_peak
            metrics[f"mem/{name}/predicted_host_peak_bytes"] = stage.host_peak
        return metrics


def predict(config: TrialConfig, actor: ModelShape, critic: ModelShape) -> MemoryPrediction:
    """Per-rank memory of each stage of the trial (see the module docstring for sources)."""
    precision, ranks = config.precision, config.ranks
    batch, ppo = config.batch, config.ppo
    seq = ppo.max_prompt_len + ppo.max_answer_len
    width = 4 if precision == "fp32" else 2

    # SFT runs on the actor's engine settings and the RM on the critic's: the same states.
    actor_states = _role_states(config, actor, config.actor, value_head=False)
    critic_states = _role_states(config, critic, config.critic, value_head=True)
    reference = _frozen_states(config, actor, config.actor, config.offload_reference, False)
    reward = _frozen_states(config, critic, config.critic, config.offload_reward, True)
    ppo_engines = {
        "actor": actor_states, "reference": reference, "critic": critic_states, "reward": reward,
    }  # fmt: skip
    # The SFT weights wait in host memory (16-bit) while the reward model trains.
    sft_weights = width * actor.num_params()

    def train_transient(shape, engine, rows, positions, value_head):
        result = {
            "activations": activation_bytes(
                shape, rows, seq, engine.gradient_checkpointing, precision
            ),
            "zero3_gather": gather_bytes(shape, engine, precision, ranks),
        }
        if not value_head:
            result["logits"] = logits_bytes(shape, rows, positions, backward=True)
        return result

    generation_gather = 0
    if config.actor.zero_stage == 3 and not config.hybrid_engine:
        # tunelab gathers the whole actor once per generation call.
        generation_gather = math.ceil(width * actor.num_params() * (1 - 1 / ranks))
    stages = {
        "sft": StageMemory(
            {"actor": actor_states},
            train_transient(actor, config.actor, batch.train_micro, seq, False),
            stepping=("actor",),
        ),
        "rm": StageMemory(
            {"critic": critic_states},
            train_transient(critic, config.critic, 2 * batch.train_micro, seq, True),
            {"sft_weights": sft_weights},
            stepping=("critic",),
        ),
        "ppo_generate": StageMemory(
            ppo_engines,
            {
                "kv_cache": kv_cache_bytes(actor, batch.generation_micro, seq, precision),
                "generation_gather": generation_gather,
                "logits": logits_bytes(actor, batch.generation_micro, 1, backward=False),
            },
        ),
        "ppo_experience": StageMemory(
            ppo_engines,
            {
                "logits": logits_bytes(
                    actor, batch.generation_micro, ppo.max_answer_len + 1, backward=False
                ),
                "zero3_gather": gather_bytes(actor, config.actor, precision, ranks),
            },
        ),
        "ppo_train": StageMemory(
            ppo_engines,
            {
                **train_transient(
                    actor, config.actor, batch.train_micro, ppo.max_answer_len + 1, False
                ),
                "critic_activations": activation_bytes(
                    critic, batch.train_micro, seq, config.critic.gradient_checkpointing, precision
                ),
            },
            stepping=("actor", "critic"),
        ),
    }
    return MemoryPrediction(ranks, stages)
