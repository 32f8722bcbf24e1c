"""Predicted memory per rank for every RLHF stage, before anything is launched (pure Python).

Model states follow the ZeRO paper (Rajbhandari et al. 2020): with Psi parameters in 16-bit
and Adam, 2Psi params + 2Psi grads + K*Psi optimizer states (K = 12: fp32 master, momentum,
variance); stage 1 partitions the optimizer states over N ranks, stage 2 also the gradients,
stage 3 also the parameters. The terms are laid out as DeepSpeed 0.19 allocates them
(deepspeed/runtime/zero/stage_1_and_2.py, stage3.py, partition_parameters.py,
runtime/fp16/fused_optimizer.py), with the bucket sizes and thresholds of each engine's own
DeepSpeed config (tunelab.dsconfig), and checked against live engines
(tests/test_memory_measured.py):

- gradients: ZeRO-0 and ZeRO-1 hold every 16-bit gradient during backward (ZeRO-1 reduces them
  only after backward, so the paper's 2Psi + 2Psi + 12Psi/N holds at its peak); ZeRO-2 keeps
  this rank's partition; all three free them after the step. ZeRO-3 keeps a persistent 16-bit
  partition buffer. ZeRO-1/2 allocate their reduce buckets (`reduce_bucket_size` elements each,
  two with overlap_comm, not capped by the model size) at the first gradient hook and release
  them after backward; ZeRO-3 allocates its one bucket at initialisation and keeps it.
  `allgather_bucket_size` allocates nothing in 0.19 (the all-gather writes the flat parameters
  in place);
- optimizer offload moves the fp32 master, its fp32 gradient and the moments to the host,
  parameter offload (ZeRO-3) the parameter partitions; Adam's moments appear at the first step
  (FP16_Optimizer, ZeRO-0 in 16-bit, makes them at initialisation);
- inside optimizer.step the flattened 16-bit gradient partition and its fp32 cast are alive
  together (`step_transient`); without the flattened copy, ZeRO-2 matches DeepSpeed's
  estimate_zero2_model_states_mem_needs (2P + 18P/N).

Construction (the `setup` stage, tunelab's design for building models): under ZeRO-3 every model
is built partitioned (deepspeed.zero.Init, or from_pretrained under HfDeepSpeedConfig) in the
engine's dtype, so a rank holds its partition, the persistent small tensors and one whole tensor
at a time; otherwise a model is built whole on the host in the engine's dtype and
deepspeed.initialize moves it to the device. Models are built one at a time. A trained model's
weights are handed on (SFT -> actor and reference, RM -> critic and reward) as a state dict in
the engine's dtype in rank 0's host memory; the figures are rank 0's, the largest.

Activations per decoder layer follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", eq. 2): s*b*h*(34 + 5*a*s/h) bytes in 16-bit
without recomputation. transformers runs attention through SDPA, whose fused kernels never
store the a*s*s score matrices, so the 5*a*s/h term is dropped (as in the paper's selective
recomputation, 34*s*b*h); `eager_attention=True` keeps it. Full recomputation keeps 2*s*b*h per
layer (the layer inputs). The generation KV cache is 2 * layers * batch * tokens * kv_width *
bytes. Logits are counted at the bytes per element their copies really take (`logits_bytes`).

The device peak used for "fits" verdicts adds `headroom`: memory the GPU holds outside
PyTorch's allocator (CUDA context, NCCL buffers), which torch's peak-allocated figure misses.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any

from tunelab.config import EngineConfig, TrialConfig
from tunelab.dsconfig import engine_ds_configs
from tunelab.presets import ModelShape
from tunelab.stagecache import STAGES as REUSABLE_STAGES

GIB = 2**30
# DeepSpeed 0.19's defaults for what a config leaves out (deepspeed/runtime/zero/config.py).
DS_REDUCE_BUCKET = 500_000_000
DS_PERSISTENCE_THRESHOLD = 100_000
DS_MAX_LIVE_PARAMETERS = 1_000_000_000
# Device memory outside PyTorch's caching allocator, per rank. An estimate, not a measurement
# here: the CUDA context with lazily loaded kernels takes several hundred MiB, and NCCL keeps
# send/receive buffers of NCCL_BUFFSIZE (4 MiB by default) per channel and peer. A GPU trial
# measures the real figure as mem/peak_device_non_torch_bytes (NVML used - torch reserved).
CUDA_CONTEXT_BYTES = GIB
NCCL_BUFFER_BYTES = GIB // 2
STAGES = ("setup", "sft", "rm", "ppo_generate", "ppo_experience", "ppo_train")
# Each engine (tunelab.records.ENGINES) -> (the stage whose prediction holds it, its role there).
ENGINE_STAGES = {
    "sft": ("sft", "actor"), "rm": ("rm", "critic"), "actor": ("ppo_train", "actor"),
    "critic": ("ppo_train", "critic"), "reference": ("ppo_train", "reference"),
    "reward": ("ppo_train", "reward"),
}  # fmt: skip


@dataclass(frozen=True)
class Split:
    """Bytes on the accelerator (`device`) and in CPU memory (`host`)."""

    device: int = 0
    host: int = 0

    def __add__(self, other: Split) -> Split:
        return Split(self.device + other.device, self.host + other.host)

    def __sub__(self, other: Split) -> Split:
        return Split(self.device - other.device, self.host - other.host)

    @property
    def total(self) -> int:
        return self.device + self.host

    @staticmethod
    def at(nbytes: float, host: bool) -> Split:
        return Split(0, math.ceil(nbytes)) if host else Split(math.ceil(nbytes), 0)

    @staticmethod
    def peak(*splits: Split) -> Split:
        """The larger of each place over moments that do not overlap in time."""
        return Split(max(s.device for s in splits), max(s.host for s in splits))


@dataclass(frozen=True)
class ZeroSettings:
    """What of one engine's DeepSpeed config decides its memory."""

    stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket: int = DS_REDUCE_BUCKET  # elements
    contiguous_gradients: bool = True
    overlap_comm: bool = False
    persistence_threshold: int = DS_PERSISTENCE_THRESHOLD
    max_live_parameters: int = DS_MAX_LIVE_PARAMETERS

    @classmethod
    def from_ds_config(cls, ds_config: dict[str, Any]) -> ZeroSettings:
        """Read a DeepSpeed config dict, DeepSpeed's defaults for the keys it leaves out."""
        zero = ds_config.get("zero_optimization", {})
        stage = int(zero.get("stage", 0))

        def offloaded(key: str) -> bool:
            return (zero.get(key) or {}).get("device", "none") != "none"

        return cls(
            stage=stage,
            offload_optimizer=offloaded("offload_optimizer"),
            offload_params=offloaded("offload_param"),
            reduce_bucket=int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)),
            contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
            # DeepSpeed turns overlap_comm on by default for ZeRO-3 only.
            overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
            persistence_threshold=int(
                zero.get("stage3_param_persistence_threshold", DS_PERSISTENCE_THRESHOLD)
            ),
            max_live_parameters=int(
                zero.get("stage3_max_live_parameters", DS_MAX_LIVE_PARAMETERS)
            ),
        )


@dataclass(frozen=True)
class EngineStates:
    """One DeepSpeed engine on one rank: its model states and the transients of its steps."""

    params: Split = Split()
    grads: Split = Split()  # this rank's gradients between backward and step
    master: Split = Split()  # fp32 master weights
    moments: Split = Split()  # Adam's momentum and variance
    buffers: Split = Split()  # kept for the engine's life: ZeRO-3 bucket, offload staging
    backward_grads: Split = Split()  # gradients at the peak of backward
    buckets: Split = Split()  # ZeRO-1/2 reduce buckets, alive only during backward
    step_transient: Split = Split()  # alive only inside optimizer.step, besides `grads`
    persistent_grads: bool = False  # gradients stay allocated between steps
    moments_at_init: bool = False  # the moments exist once deepspeed.initialize returns
    load_peak: Split = Split()  # everything of this engine at the peak of building it

    @property
    def optimizer(self) -> Split:
        return self.master + self.moments

    @property
    def model_states(self) -> Split:
        """params + grads + optimizer: what the ZeRO paper counts (and tests compare)."""
        return self.params + self.grads + self.optimizer

    @property
    def resident(self) -> Split:
        """What the engine holds while it does not train (generation, experience)."""
        kept = self.params + self.optimizer + self.buffers
        return kept + self.grads if self.persistent_grads else kept

    @property
    def loaded(self) -> Split:
        """What the engine holds once deepspeed.initialize returns (no step taken yet)."""
        kept = self.params + self.master + self.buffers
        if self.moments_at_init:
            kept += self.moments
        return kept + self.grads if self.persistent_grads else kept

    def training_extra(self, activations: int) -> Split:
        """Bytes above `resident` while this engine trains: the larger of backward (gradients,
        buckets and `activations`, device bytes of the forward kept for backward) and step."""
        backward = self.backward_grads + self.buckets + Split(activations, 0)
        step = self.grads + self.step_transient
        kept = self.grads if self.persistent_grads else Split()
        return Split.peak(backward, step) - kept

    def to_dict(self) -> dict[str, Any]:
        splits = ("params", "grads", "master", "moments", "buffers", "backward_grads",
                  "buckets", "step_transient", "load_peak", "optimizer", "model_states",
                  "resident")  # fmt: skip
        return {name: vars(getattr(self, name)) for name in splits}


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


def _bytes_per_element(precision: str) -> int:
    """Parameters, gradients and activations: 16-bit unless the trial runs fp32."""
    return 4 if precision == "fp32" else 2


def engine_states(
    trainable: list[int], frozen: list[int], zero: ZeroSettings, *, ranks: int, precision: str
) -> EngineStates:
    """Model states per rank of one engine (no optimizer when `trainable` is empty)."""
    w, n = _bytes_per_element(precision), ranks
    tensors = trainable + frozen
    t_count, p_count = sum(trainable), sum(tensors)
    if zero.stage == 3:
        # Small tensors stay whole on every rank besides their partition (one rank: the same).
        persistent = sum(t for t in tensors if t <= zero.persistence_threshold)
        whole = w * persistent if n > 1 else 0
        params = Split.at(w * p_count / n, zero.offload_params) + Split.at(whole, False)
        # zero.Init makes each tensor whole on the device before partitioning it.
        built = params + Split(w * max(tensors), 0)
    else:
        params = Split(w * p_count, 0)
        # Built whole on the host, then moved to the device by deepspeed.initialize.
        built = Split.peak(Split(0, w * p_count), params)
    if not trainable:
        return EngineStates(params=params, load_peak=built)
    if zero.stage == 0:
        return _zero0_states(params, t_count, w, built)
    if zero.stage == 3:
        return _zero3_states(params, zero, t_count / n, w, max(trainable), max(tensors), built)
    return _zero12_states(params, zero, t_count, t_count / n, w, max(trainable), built)


def _zero0_states(params: Split, t_count: int, w: int, built: Split) -> EngineStates:
    if w == 4:
        # fp32: the torch optimizer trains the module's own parameters, no master copy.
        grads = Split(4 * t_count, 0)
        return EngineStates(
            params, grads, moments=Split(8 * t_count, 0), backward_grads=grads, load_peak=built
        )
    # FP16_Optimizer: flattens clones of the 16-bit weights, keeps an fp32 flat master, and
    # steps once at initialisation (zero fp32 gradient), which makes Adam's moments. Its step
    # casts every gradient to fp32 and flattens the list: both alive together.
    grads = Split(w * t_count, 0)
    master, moments = Split(4 * t_count, 0), Split(8 * t_count, 0)
    flatten = params + Split(2 * w * t_count, 0)
    initial_step = params + master + moments + Split(4 * t_count, 0)
    return EngineStates(
        params, grads, master, moments, backward_grads=grads,
        step_transient=Split(8 * t_count, 0), moments_at_init=True,
        load_peak=Split.peak(built, flatten, initial_step),
    )  # fmt: skip


def _zero12_states(params, zero, t_count, share, w, largest, built) -> EngineStates:
    """ZeRO-1 (gradients reduced after backward) and ZeRO-2 (reduced in backward hooks)."""
    offload = zero.offload_optimizer
    contiguous = zero.contiguous_gradients or offload  # DeepSpeed forces it under offload
    count = (2 if zero.overlap_comm else 1) if contiguous else 0
    buckets = Split(w * zero.reduce_bucket * count, 0)
    if zero.stage == 1:
        backward = Split(w * t_count, 0)  # every 16-bit gradient, reduced after backward
    else:
        # This rank's partition plus the one gradient autograd just made, before the hook
        # copies it into a bucket.
        backward = (
            Split(w * largest, 0) if offload else Split(math.ceil(w * share) + w * largest, 0)
        )
    flatten = params + Split(w * t_count, 0)  # the 16-bit weights flattened beside the originals
    master = Split.at(4 * share, offload)
    moments = Split.at(8 * share, offload)
    if offload:
        # fp32 gradient partition (pinned, kept), a 16-bit copy of the partition and one staging
        # buffer of the largest tensor on each side.
        grads = Split(0, math.ceil(4 * share))
        buffers = Split(w * largest, math.ceil(w * share) + w * largest)
        states = EngineStates(
            params, grads, master, moments, buffers, backward_grads=backward + grads,
            buckets=buckets, persistent_grads=True,
        )  # fmt: skip
        return replace(states, load_peak=Split.peak(built, flatten, states.loaded))
    grads = Split(math.ceil(w * share), 0)
    # step flattens the 16-bit partition, then casts it to fp32 (a no-op when fp32).
    step = Split(math.ceil((w + 4 if w == 2 else 4) * share), 0)
    states = EngineStates(
        params, grads, master, moments, backward_grads=backward, buckets=buckets,
        step_transient=step,
    )  # fmt: skip
    initial_gradient = Split(math.ceil(4 * share), 0)  # initialize_optimizer_states, then freed
    return replace(states, load_peak=Split.peak(built, flatten, states.loaded + initial_gradient))


def _zero3_states(params, zero, share, w, largest, largest_any, built) -> EngineStates:
    offload = zero.offload_optimizer
    # The 16-bit gradient partition buffer (kept), the fp32 gradients under offload (kept).
    grads = Split.at(w * share, offload) + Split.at(4 * share if offload else 0, True)
    master = Split.at(4 * share, offload)
    moments = Split.at(8 * share, offload)
    buffers = Split(w * zero.reduce_bucket if zero.contiguous_gradients else 0, 0)
    # A whole gradient of the largest tensor before its reduce-scatter.
    backward = grads + Split(w * largest, 0)
    step = Split(0 if offload else math.ceil((w + 4 if w == 2 else 4) * share), 0)
    states = EngineStates(
        params, grads, master, moments, buffers, backward_grads=backward, step_transient=step,
        persistent_grads=True,
    )  # fmt: skip
    # After initialize: the trainable partitions made contiguous (a copy), the initial fp32
    # gradient buffer, or one tensor gathered to take rank 0's hand-off weights.
    extra = Split.peak(
        Split.at(w * share, zero.offload_params),
        Split(0 if offload else math.ceil(4 * share), 0),
        Split(w * largest_any, 0),
    )
    return replace(states, load_peak=Split.peak(built, states.loaded + extra))


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


# Bytes per logit element at the peak of each way the pipeline uses logits. 16-bit model:
# - "loss" (SFT; transformers' ForCausalLMLoss): forward holds the logits (2), their fp32 upcast
#   (4) and log-softmax (4); backward holds the saved log-softmax, its gradient and the input's
#   gradient, all fp32 (12), the logits already freed. fp32 model: upcast is the tensor itself.
# - "logprobs" (PPO; ppo_math.token_logprobs, with or without grad): the logits (2), the fp32
#   logits / temperature (4), CUDA's contiguous copy of that transposed input (4, aten's
#   host_softmax) and the log-softmax (4); backward as above (12).
_LOGIT_BYTES = {
    ("loss", 2): 12, ("loss", 4): 12, ("logprobs", 2): 14, ("logprobs", 4): 16,
}  # fmt: skip


def logits_bytes(shape: ModelShape, rows: int, positions: int, precision: str, use: str) -> int:
    """Logits over the vocabulary with their fp32 copies: rows * positions * V * bytes."""
    return rows * positions * shape.vocab_size * _LOGIT_BYTES[use, _bytes_per_element(precision)]


def kv_cache_bytes(shape: ModelShape, batch: int, tokens: int, precision: str) -> int:
    """Keys and values of every layer for `tokens` positions: 2 * L * b * t * kv_width * bytes."""
    return 2 * shape.num_layers * batch * tokens * shape.kv_dim * _bytes_per_element(precision)


def _partitioned(tensors: list[int], zero: ZeroSettings) -> int:
    return sum(t for t in tensors if t > zero.persistence_threshold)


def gather_bytes(tensors: list[int], zero: ZeroSettings, precision: str) -> int:
    """ZeRO-3 parameters gathered while computing: whole tensors (each a new buffer beside the
    partition), up to stage3_max_live_parameters elements at once."""
    if zero.stage != 3:
        return 0
    live = min(_partitioned(tensors, zero), zero.max_live_parameters)
    return _bytes_per_element(precision) * live


def whole_model_gather_bytes(tensors: list[int], zero: ZeroSettings, precision: str) -> int:
    """Every partitioned tensor gathered at once (GatheredParameters over the whole model)."""
    return _bytes_per_element(precision) * _partitioned(tensors, zero) if zero.stage == 3 else 0


@dataclass(frozen=True)
class StageMemory:
    """Everything one rank holds at the peak of one stage.

    `training` maps each engine that trains in the stage to its forward/backward device
    transients (activations, logits, gathered parameters). Engines train one after the other
    (PPO: actor, then critic), so only the largest of them counts at the peak.
    """

    engines: dict[str, EngineStates] = field(default_factory=dict)
    transient: dict[str, int] = field(default_factory=dict)  # device bytes at the peak
    host_transient: dict[str, int] = field(default_factory=dict)
    training: dict[str, dict[str, int]] = field(default_factory=dict)

    def training_extra(self) -> Split:
        extras = [self.engines[role].training_extra(sum(items.values()))
                  for role, items in self.training.items()]  # fmt: skip
        return Split.peak(Split(), *extras)

    @property
    def device_peak(self) -> int:
        resident = sum(e.resident.device for e in self.engines.values())
        return resident + sum(self.transient.values()) + self.training_extra().device

    @property
    def host_peak(self) -> int:
        resident = sum(e.resident.host for e in self.engines.values())
        return resident + sum(self.host_transient.values()) + self.training_extra().host

    def to_dict(self) -> dict[str, Any]:
        return {
            "engines": {role: states.to_dict() for role, states in self.engines.items()},
            "transient": dict(self.transient),
            "host_transient": dict(self.host_transient),
            "training": {role: dict(items) for role, items in self.training.items()},
            "device_peak": self.device_peak,
            "host_peak": self.host_peak,
        }


@dataclass(frozen=True)
class SetupMemory:
    """Building the engines, one at a time: the peak is the worst of these moments."""

    moments: dict[str, StageMemory]

    @property
    def device_peak(self) -> int:
        return max(moment.device_peak for moment in self.moments.values())

    @property
    def host_peak(self) -> int:
        return max(moment.host_peak for moment in self.moments.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "moments": {name: moment.to_dict() for name, moment in self.moments.items()},
            "device_peak": self.device_peak,
            "host_peak": self.host_peak,
        }


def _building(built: dict[str, EngineStates], role: str, states: EngineStates,
              waiting: dict[str, int]) -> StageMemory:  # fmt: skip
    """The moment `role` is built while the engines in `built` hold their loaded states and
    the hand-off weights in `waiting` sit in rank 0's host memory."""
    return StageMemory(
        transient={**{f"{r} (built)": s.loaded.device for r, s in built.items()},
                   f"{role} (building)": states.load_peak.device},
        host_transient={**{f"{r} (built)": s.loaded.host for r, s in built.items()},
                        f"{role} (building)": states.load_peak.host, **waiting},
    )  # fmt: skip


def setup_memory(engines: dict[str, EngineStates], sft_weights: int, rm_weights: int):
    """Load-time moments: the SFT engine, the RM engine (the SFT weights waiting on rank 0), and
    PPO's actor, reference, critic, reward in turn (both state dicts waiting on rank 0). A
    stage given rather than trained (0 hand-off bytes) builds no engine of its own."""
    moments = {}
    if sft_weights:
        moments["sft"] = _building({}, "sft", engines["sft"], {})
    if rm_weights:
        moments["rm"] = _building({}, "rm", engines["rm"], {"sft weights (rank 0)": sft_weights})
    waiting = {"sft weights (rank 0)": sft_weights, "rm weights (rank 0)": rm_weights}
    built: dict[str, EngineStates] = {}
    for role in ("actor", "reference", "critic", "reward"):
        moments[f"ppo {role}"] = _building(built, role, engines[role], waiting)
        built[role] = engines[role]
    return SetupMemory(moments)


@dataclass(frozen=True)
class MemoryPrediction:
    """Per-rank peaks of every stage; `device_peak` adds the headroom a GPU needs besides
    PyTorch's allocations (use it for budgets), `device_peak_allocated` is what torch's
    max_memory_allocated would show (compare it with measurements)."""

    ranks: int
    stages: dict[str, StageMemory | SetupMemory]
    headroom: int = 0

    @property
    def device_peak_allocated(self) -> int:
        return max(stage.device_peak for stage in self.stages.values())

    @property
    def device_peak(self) -> int:
        return self.device_peak_allocated + self.headroom

    @property
    def host_peak(self) -> int:
        return max(stage.host_peak for stage in self.stages.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "ranks": self.ranks,
            "device_peak": self.device_peak,
            "device_peak_allocated": self.device_peak_allocated,
            "headroom": self.headroom,
            "host_peak": self.host_peak,
            "stages": {name: stage.to_dict() for name, stage in self.stages.items()},
        }

    def flat_metrics(self) -> dict[str, int]:
        """`mem/<stage>/predicted_*` next to the measured `mem/<stage>/peak_*` of a trial.

        Device figures are torch allocations (no headroom), comparable with
        peak_device_allocated; the headroom is its own metric."""
        metrics = {
            "mem/predicted_device_peak_bytes": self.device_peak_allocated,
            "mem/predicted_device_headroom_bytes": self.headroom,
            "mem/predicted_host_peak_bytes": self.host_peak,
        }
        for name, stage in self.stages.items():
            metrics[f"mem/{name}/predicted_device_peak_bytes"] = stage.device_peak
            metrics[f"mem/{name}/predicted_host_peak_bytes"] = stage.host_peak
        for engine, (stage, role) in ENGINE_STAGES.items():
            if stage in self.stages:  # absent: a stage given or reused, not trained
                states = self.stages[stage].engines[role]
                metrics[f"mem/{engine}/predicted_model_states_bytes"] = states.model_states.total
        return metrics


def device_headroom(ranks: int) -> int:
    """CUDA context per rank, plus NCCL's buffers when ranks communicate."""
    return CUDA_CONTEXT_BYTES + (NCCL_BUFFER_BYTES if ranks > 1 else 0)


def trial_prediction(
    config: TrialConfig, actor: ModelShape, critic: ModelShape, on_cuda: bool,
    reused: Collection[str] = (),
) -> MemoryPrediction:
    """The prediction a trial records, the same whether the orchestrator makes it before launch
    or the trial itself (which knows a hub model's shape): device headroom for a CUDA trial,
    none for one on the CPU; `reused` stages left out."""
    return predict(config, actor, critic, None if on_cuda else 0, reused)


def predict(
    config: TrialConfig,
    actor: ModelShape,
    critic: ModelShape,
    headroom: int | None = None,
    reused: Collection[str] = (),
) -> MemoryPrediction:
    """Per-rank memory of each stage of the trial (see the module docstring for sources).

    `headroom`: device bytes outside PyTorch's allocator; default `device_headroom(ranks)`
    (a CUDA GPU), 0 for a node whose accelerator is the CPU. `reused`: stages (sft, rm) the
    trial loads from the study's stage cache instead of running."""
    precision, ranks = config.precision, config.ranks
    batch, ppo = config.batch, config.ppo
    seq = ppo.max_prompt_len + ppo.max_answer_len
    answer_positions = ppo.max_answer_len + 1  # logits_to_keep in the PPO forward passes
    ds_configs = engine_ds_configs(config)
    zero = {role: ZeroSettings.from_ds_config(ds) for role, ds in ds_configs.items()}
    shapes = {"sft": actor, "actor": actor, "reference": actor,
              "rm": critic, "critic": critic, "reward": critic}  # fmt: skip
    trained = {"sft": config.actor, "actor": config.actor,
               "rm": config.critic, "critic": config.critic}  # fmt: skip
    value_heads = ("rm", "critic", "reward")
    tensors = {
        role: engine_tensors(shapes[role], trained.get(role), role in value_heads)
        for role in shapes
    }
    engines = {
        role: engine_states(*tensors[role], zero[role], ranks=ranks, precision=precision)
        for role in shapes
    }

    def gather(role: str) -> int:
        return gather_bytes(tensors[role][0] + tensors[role][1], zero[role], precision)

    def training(role: str, rows: int, logits: int = 0) -> dict[str, int]:
        checkpointing = trained[role].gradient_checkpointing
        items = {
            "activations": activation_bytes(shapes[role], rows, seq, checkpointing, precision),
            "zero3_gather": gather(role),
        }
        return {**items, "logits": logits} if logits else items

    micro, generation_micro = batch.train_micro, batch.generation_micro
    sft_logits = logits_bytes(actor, micro, seq, precision, "loss")
    train_logits = logits_bytes(actor, micro, answer_positions, precision, "logprobs")
    experience_logits = logits_bytes(
        actor, generation_micro, answer_positions, precision, "logprobs"
    )
    actor_tensors = tensors["actor"][0] + tensors["actor"][1]
    # Hand-off state dicts in the engine's dtype, one copy per parameter (tied weights once);
    # none for a stage given rather than trained (0 steps), whose stage is left out too.
    width = _bytes_per_element(precision)
    sft_weights = width * actor.num_params() if config.sft.steps else 0
    rm_weights = width * (critic.num_params(lm_head=False) + critic.output_dim)
    rm_weights = rm_weights if config.rm.steps else 0
    ppo_engines = {role: engines[role] for role in ("actor", "reference", "critic", "reward")}
    stages: dict[str, StageMemory | SetupMemory] = {
        "setup": setup_memory(engines, sft_weights, rm_weights),
        "sft": StageMemory(
            {"actor": engines["sft"]},  # SFT trains on the actor's engine settings
            host_transient={"sft weights (rank 0, hand-off)": sft_weights},
            training={"actor": training("sft", micro, sft_logits)},
        ),
        "rm": StageMemory(
            {"critic": engines["rm"]},  # the reward model on the critic's
            host_transient={
                "sft weights (rank 0)": sft_weights,
                "rm weights (rank 0, hand-off)": rm_weights,
            },
            training={"critic": training("rm", 2 * micro)},  # chosen and rejected at once
        ),
        "ppo_generate": StageMemory(
            ppo_engines,
            {
                "kv_cache": kv_cache_bytes(actor, generation_micro, seq, precision),
                # ppo.zero3_generation: the whole ZeRO-3 actor once per generation call, or
                # up to stage3_max_live_parameters at a time (DeepSpeed-Chat's per_layer).
                "generation_gather": (
                    whole_model_gather_bytes
                    if ppo.zero3_generation == "gather_once"
                    else gather_bytes
                )(actor_tensors, zero["actor"], precision),
                "logits": logits_bytes(actor, generation_micro, 1, precision, "logprobs"),
            },
        ),
        "ppo_experience": StageMemory(
            ppo_engines,
            # The four forward passes run one after another: the largest gather counts.
            {"logits": experience_logits, "zero3_gather": max(map(gather, ppo_engines))},
        ),
        "ppo_train": StageMemory(
            ppo_engines,
            training={
                "actor": training("actor", micro, train_logits),
                "critic": training("critic", micro),
            },
        ),
    }
    for stage in REUSABLE_STAGES:
        if not getattr(config, stage).steps or stage in reused:
            del stages[stage]
    return MemoryPrediction(
        ranks, stages, device_headroom(ranks) if headroom is None else headroom
    )
