"""What every stage of a trial reads: configuration, runtime, data, models' sources, meters."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tunelab.config import TrialConfig
from tunelab.pipeline.batching import EncodedData
from tunelab.pipeline.runtime import Runtime
from tunelab.pipeline.telemetry import (
    MemoryTracker,
    PhaseTimer,
    ProgressLog,
    engine_state_bytes,
    timed_steps,
)
from tunelab.presets import ModelShape, ModelSource

log = logging.getLogger("tunelab")


@dataclass
class TrialContext:
    config: TrialConfig
    runtime: Runtime
    tokenizer: object
    data: EncodedData
    actor_source: ModelSource
    critic_source: ModelSource
    actor_shape: ModelShape
    critic_shape: ModelShape
    ds_configs: dict[str, dict]
    timer: PhaseTimer
    memory: MemoryTracker
    progress: ProgressLog
    engine_states: dict[str, dict] = field(default_factory=dict)  # measured, by engine role
    # Steps of each stage ("sft", "rm", "ppo") in which fp16 dynamic loss scaling skipped an
    # optimizer step (an overflow): they do less work, so they are kept out of throughput.
    skipped: dict[str, set[int]] = field(default_factory=dict)
    engines: dict[str, dict] = field(default_factory=dict)  # what each engine holds, by role

    @property
    def sequence_len(self) -> int:
        return self.config.ppo.max_prompt_len + self.config.ppo.max_answer_len

    def record_states(self, role: str, engine) -> None:
        """Model-state bytes of a live engine, read once per role. Trained engines are read
        between a backward and its step once the optimizer has stepped (Adam creates its
        moments at the first step): then params, grads and optimizer states all exist."""
        if role in self.engine_states:  # asked at every micro-step: the cheap test first
            return
        frozen = not any(p.requires_grad for p in engine.module.parameters())
        if frozen or engine.global_steps >= 1:
            self.engine_states[role] = engine_state_bytes(engine, self.runtime.accelerator)

    def record_engine(self, role: str, engine, weights: str) -> None:
        """Log and keep what an engine holds: where its weights came from, its parameter counts
        (whole, also under ZeRO-3) and ZeRO stage."""
        from tunelab.pipeline.models import parameter_counts

        total, trainable = parameter_counts(engine.module)
        stage = engine.zero_optimization_stage()
        self.engines[role] = {"weights": weights, "parameters": total,
                              "trainable_parameters": trainable, "zero_stage": stage}  # fmt: skip
        log.info("rank %d: %s engine, ZeRO-%d, %d parameters (%d trained), weights: %s",
                 self.runtime.rank, role, stage, total, trainable, weights)  # fmt: skip

    def adapters(self, role: str) -> int | None:
        """Weights the `role` engine trains under LoRA (adapters, and a value head), for
        tunelab.flops; None when it fine-tunes every weight."""
        settings = self.config.actor if role in ("sft", "actor") else self.config.critic
        if settings.lora_rank == 0:
            return None
        return self.engines[role]["trainable_parameters"]

    def source_weights(self, source: ModelSource) -> str:
        """How a model built straight from a source gets its weights, in words."""
        if source.hf_path is None:
            return f"random ({source.name} preset)"
        return f"checkpoint {source.hf_path}"

    def overhead(self, name: str):
        """Time work outside the stages' timed steps (`setup`, `eval`, `handoff`), summed."""
        return self.timer.phase(name, 0)

    def timed_phase(self, name: str, step: int):
        """Time step `step` of phase `name` (every step is kept; see timed_steps)."""
        return self.timer.phase(name, step)

    def note_skipped(self, stage: str, step: int, engine, skipped_before: int) -> None:
        """Remember `step` of `stage` when `engine` skipped an optimizer step during it."""
        if engine.skipped_steps > skipped_before:
            self.skipped.setdefault(stage, set()).add(step)

    def timed_steps(self, stage: str, steps: int) -> list[int]:
        """Steps of a stage that count towards throughput (see telemetry.timed_steps)."""
        return timed_steps(stage, steps, self.config.warmup_steps, self.skipped.get(stage, set()))

    def skipped_series(self, stage: str, steps: int) -> list[int]:
        """1 for each step of `stage` fp16 loss scaling skipped, else 0."""
        skipped = self.skipped.get(stage, set())
        return [int(step in skipped) for step in range(steps)]
