"""The trial configuration: every knob a study searches, as frozen dataclasses.

Loaded from YAML or JSON with dotted `key=value` overrides; unknown keys, wrong types and
inconsistent batch arithmetic are rejected, every one at once, each on one line naming the key
(tunelab.errors.InputError). Each dataclass states its rules in `checks()`, which yields
(key, what is wrong) pairs; `__post_init__` enforces them.
PPO defaults are DeepSpeed-Chat's (dschat/rlhf/ppo_trainer.py), which hard-codes them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunelab._typed import (
    Problem,
    Problems,
    apply_overrides,
    at_least,
    enforce,
    from_mapping,
    positive,
    read_mapping,
    to_mapping,
)
from tunelab.errors import InputError
from tunelab.records import STAGES

Precision = Literal["fp32", "bf16", "fp16"]
Offload = Literal["none", "cpu"]
Device = Literal["auto", "cpu", "cuda"]
Tracker = Literal["none", "csv", "tensorboard", "wandb"]
# The package each tracker needs beside DeepSpeed (its csv monitor needs none).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
SEED_LIMIT = 2**32  # numpy's and transformers.set_seed's seeds lie in [0, 2**32)


@dataclass(frozen=True)
class EngineConfig:
    """How one trained model (actor, or critic/reward) runs on DeepSpeed."""

    zero_stage: int = 0
    # cpu: ZeRO-Offload at stages 1-3; at stage 0 DeepSpeed runs CPU Adam as DeepSpeed-Chat's
    # --offload makes it, which works only on the CPU accelerator (refused on GPUs: devices.py)
    offload_optimizer: Offload = "none"
    offload_params: Offload = "none"  # ZeRO-3 only
    gradient_checkpointing: bool = False
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_modules: tuple[str, ...] = ("all-linear",)  # peft target_modules
    lora_scaling: float = 1.0  # adapters scaled by lora_scaling / lora_rank (DeepSpeed-Chat's)
    learning_rate: float = 9.65e-6  # PPO learning rate (DeepSpeed-Chat actor default)
    # LoRA adapters' learning rate in every stage on these settings (--*_lora_learning_rate)
    lora_learning_rate: float = 5e-4
    # Dropout set in the model config (DeepSpeed-Chat's --actor_dropout/--critic_dropout);
    # None keeps the model's own (OPT: 0.1).
    dropout: float | None = None

    def __post_init__(self) -> None:
        enforce(self)

    def checks(self) -> Iterator[Problem]:
        if self.zero_stage not in (0, 1, 2, 3):
            yield "zero_stage", f"must be 0-3, got {self.zero_stage}"
        if self.offload_params == "cpu" and self.zero_stage != 3:
            yield (
                "offload_params",
                "cpu needs zero_stage 3 (DeepSpeed offloads params only there)",
            )
        if self.lora_rank < 0:
            yield "lora_rank", f"must be >= 0, got {self.lora_rank}"
        if self.lora_rank > 0 and not self.lora_modules:
            yield "lora_modules", "must name at least one module when lora_rank > 0"
        yield from positive(self, "lora_scaling", "learning_rate", "lora_learning_rate")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            yield "dropout", f"must lie in [0, 1), got {self.dropout}"


@dataclass(frozen=True)
class ModelsConfig:
    """Model sources: a preset shape (random weights), a local Hugging Face dir or hub name."""

    actor: str = "tiny"
    critic: str = "tiny"
    # A critic checkpoint given as the reward model (rm.steps: 0) must carry a value head;
    # true accepts one without, its head freshly initialised (scores are then meaningless).
    fresh_value_head: bool = False


@dataclass(frozen=True)
class DataConfig:
    """`synthetic` (the shipped task with a known gold reward), or preference data: a file (JSON
    lines, a JSON array or Parquet), a folder (DeepSpeed-Chat's local/jsonfile layout
    data/train.json + data/eval.json, or train/eval files), or a Hugging Face dataset."""

    source: str = "synthetic"
    train_size: int = 2048  # synthetic examples generated (ignored for files)
    # Held-out pairs (RM accuracy) and prompts (PPO start/end evaluation). With eval_seed, 256
    # instead of 64 took the sd of ppo/gold_end over 5 seeds from 0.063 to 0.028, of
    # ppo/gold_gain from 0.058 to 0.038 (reports/bench/noise.md)
    eval_size: int = 256
    eval_source: str | None = None  # a separate evaluation file (else the source's own split)

    def __post_init__(self) -> None:
        enforce(self)

    def checks(self) -> Iterator[Problem]:
        if not self.source.strip():
            yield "source", "must be 'synthetic', a data file or folder, or a dataset name"
        if self.eval_source is not None and self.source == "synthetic":
            yield "eval_source", "needs a data.source other than synthetic"
        yield from at_least(1, self, "train_size", "eval_size")


@dataclass(frozen=True)
class BatchConfig:
    """Per-rank batch sizes; DeepSpeed's train_batch_size = micro x accumulation x ranks."""

    train_micro: int = 16
    generation_micro: int = 16
    grad_accum: int = 1
    train_global: int | None = None  # optional; checked against micro x accumulation x ranks

    def __post_init__(self) -> None:
        enforce(self)

    def checks(self) -> Iterator[Problem]:
        yield from at_least(1, self, "train_micro", "generation_micro", "grad_accum")
        if self.train_global is not None:
            yield from at_least(1, self, "train_global")


@dataclass(frozen=True)
class StageConfig:
    """Step budget and learning rate of a supervised stage (SFT or reward model). 0 steps:
    the stage is given, not trained (models.actor is the SFT model, models.critic the reward
    model)."""

    steps: int = 20
    learning_rate: float = 9.65e-6

    def __post_init__(self) -> None:
        enforce(self)

    def checks(self) -> Iterator[Problem]:
        yield from at_least(0, self, "steps")  # 0: the stage is given, not trained
        yield from positive(self, "learning_rate")


@dataclass(frozen=True)
class PPOConfig:
    """DeepSpeed-Chat step 3; its hard-coded coefficients become knobs with the same defaults."""

    steps: int = 10
    kl_coef: float = 0.1
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    epochs: int = 1
    generation_batches: int = 1
    reward_clip: float = 5.0
    max_prompt_len: int = 256
    max_answer_len: int = 256
    min_answer_len: int = 1  # = max_answer_len: fixed-length answers, DeepSpeed-Chat's benchmark
    temperature: float = 1.0
    # `sample` from the actor's distribution at `temperature`, or `greedy`: DeepSpeed-Chat's
    # generate call passes no sampling arguments, so OPT checkpoints decode greedily there.
    decoding: Literal["sample", "greedy"] = "sample"
    # How a ZeRO-3 actor's parameters reach every rank for generation: gathered once per
    # generate call (DeepSpeed's unwrap_model_for_generation), or layer by layer for every token
    # with synced_gpus (DeepSpeed-Chat's way; least memory).
    zero3_generation: Literal["gather_once", "per_layer"] = "gather_once"

    def __post_init__(self) -> None:
        enforce(self)

    def checks(self) -> Iterator[Problem]:
        yield from at_least(1, self, "steps", "epochs", "generation_batches", "max_prompt_len",
                            "max_answer_len")  # fmt: skip
        if not 1 <= self.min_answer_len <= max(self.max_answer_len, 1):
            yield (
                "min_answer_len",
                f"must lie in [1, max_answer_len={self.max_answer_len}], "
                f"got {self.min_answer_len}",
            )
        yield from at_least(0, self, "kl_coef", "clip_range", "value_clip_range", "reward_clip")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                yield name, f"must lie in [0, 1], got {getattr(self, name)}"
        yield from positive(self, "temperature")


@dataclass(frozen=True)
class TrialConfig:
    """One point of the search space: the full SFT -> RM -> PPO run."""

    seed: int = 1234
    # Seed of what evaluation draws: the synthetic held-out set and the sampling of PPO's start
    # and end evaluations, apart from training's stream. Fixed, so every trial of a study is
    # judged on the same prompts and draws (common random numbers); null: the trial's seed.
    eval_seed: int | None = 0
    ranks: int = 1
    device: Device = "auto"
    precision: Precision = "bf16"
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    # SFT runs on the actor's engine settings, the reward model on the critic's. The actor's
    # dropout is 0 as in DeepSpeed-Chat's scripts (--actor_dropout 0.0).
    actor: EngineConfig = field(default_factory=lambda: EngineConfig(dropout=0.0))
    critic: EngineConfig = field(default_factory=lambda: EngineConfig(learning_rate=5e-6))
    offload_reference: bool = False
    offload_reward: bool = False
    # DeepSpeed's hybrid engine for generation: refused as unsupported (tunelab.devices).
    hybrid_engine: bool = False
    sft: StageConfig = field(default_factory=StageConfig)
    rm: StageConfig = field(default_factory=lambda: StageConfig(learning_rate=5e-6))
    ppo: PPOConfig = field(default_factory=PPOConfig)
    warmup_steps: int = 1  # per stage, excluded from timing
    peak_tflops: float | None = None  # device peak for MFU; None = tunelab.gpus table by name
    # Opt-in: the trained engines' losses and PPO's per-step curves through DeepSpeed's own
    # monitor (csv, tensorboard or wandb), written under DIR/tracker/ of the trial.
    tracker: Tracker = "none"

    def __post_init__(self) -> None:
        enforce(self)

    def checks(self) -> Iterator[Problem]:
        batch = self.batch
        if self.tracker in TRACKER_PACKAGES and not importlib.util.find_spec(
            TRACKER_PACKAGES[self.tracker]
        ):
            yield ("tracker", f"{self.tracker} needs the {TRACKER_PACKAGES[self.tracker]} "
                   f"package here (pip install {TRACKER_PACKAGES[self.tracker]}); csv needs "
                   "none")  # fmt: skip
        for name in ("seed", "eval_seed"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < SEED_LIMIT:
                yield name, f"must lie in [0, 2**32), got {value}"
        yield from at_least(1, self, "ranks")
        if batch.train_global is not None:
            product = batch.train_micro * batch.grad_accum * self.ranks
            if batch.train_global != product:
                yield (
                    "batch.train_global",
                    f"{batch.train_global} but batch.train_micro x batch.grad_accum x ranks = "
                    f"{batch.train_micro} x {batch.grad_accum} x {self.ranks} = {product}",
                )
        experience = batch.generation_micro * self.ppo.generation_batches
        if experience % batch.train_micro:
            # Gradient accumulation may span PPO steps (DeepSpeed-Chat's single-GPU scripts do).
            yield (
                "batch.generation_micro",
                f"PPO experience per rank (batch.generation_micro x ppo.generation_batches = "
                f"{experience}) must be a multiple of batch.train_micro = {batch.train_micro}",
            )
        if self.warmup_steps < 0:
            yield "warmup_steps", f"must be >= 0, got {self.warmup_steps}"
        short = [f"{stage} ({stage}.steps={getattr(self, stage).steps})"
                 for stage in STAGES
                 if 0 < getattr(self, stage).steps <= self.warmup_steps]  # 0: a given stage
        if short:
            yield "warmup_steps", f"{self.warmup_steps} leaves no timed step in {', '.join(short)}"
        if self.offload_reference and self.actor.zero_stage != 3:
            yield (
                "offload_reference",
                "needs actor.zero_stage 3 (the reference follows the actor's stage, and "
                "DeepSpeed offloads parameters only under ZeRO-3)",
            )
        if self.offload_reward and self.critic.zero_stage != 3:
            yield "offload_reward", "needs critic.zero_stage 3 (same rule as the reference)"
        if (
            self.hybrid_engine
            and self.actor.zero_stage == 2
            and self.critic.zero_stage == 2
            and "cpu" in (self.actor.offload_optimizer, self.critic.offload_optimizer)
            and self.actor.lora_rank == 0
        ):
            # DeepSpeed-Chat refuses this combination (main.py of step 3).
            yield (
                "hybrid_engine",
                "with ZeRO-2 actor and critic, offload and no LoRA is unsupported "
                "(DeepSpeed-Chat refuses it)",
            )
        if self.peak_tflops is not None:
            yield from positive(self, "peak_tflops")

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)

    def replace(self, **changes: Any) -> TrialConfig:
        return dataclasses.replace(self, **changes)


def config_from_dict(
    data: dict[str, Any], where: str = "config:", problems: Problems | None = None
) -> TrialConfig:
    """A TrialConfig from a mapping; every error raised at once (or added to `problems`)."""
    return from_mapping(TrialConfig, data, where, problems)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrialConfig:
    """Read a trial config (YAML/JSON; None = defaults) and apply dotted overrides."""
    data: dict[str, Any] = {}
    where = "config:"
    if path is not None:
        path = Path(path)
        data = read_mapping(path)
        where = f"{path}:"
    try:
        data = apply_overrides(data, overrides)
    except InputError as exc:
        raise InputError(f"{where} {exc}") from None
    return config_from_dict(data, where)


def check_inputs(config: TrialConfig) -> None:
    """Check what a trial reads before launching it: model sources, data file, lengths."""
    from tunelab.data import load_preferences
    from tunelab.presets import hub_cache_problem, resolve_model

    for role in ("actor", "critic"):
        source = resolve_model(getattr(config.models, role))
        if source.shape is None and (problem := hub_cache_problem(source.name)):
            raise InputError(f"models.{role}: {problem}")
        length = config.ppo.max_prompt_len + config.ppo.max_answer_len
        if source.shape is not None and length > source.shape.max_positions:
            raise InputError(
                f"ppo.max_prompt_len + ppo.max_answer_len = {length} exceeds the "
                f"{source.shape.max_positions} positions of models.{role} ({source.name})"
            )
    data = config.data
    if data.source != "synthetic":
        load_preferences(data.source, data.train_size, data.eval_size, config.seed,
                         data.eval_source, config.eval_seed)  # fmt: skip
