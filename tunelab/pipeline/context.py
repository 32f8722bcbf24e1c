"""What every stage of a trial reads: configuration, runtime, data, models' sources, meters."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.config import TrialConfig
from tunelab.pipeline.batching import EncodedData
from tunelab.pipeline.runtime import Runtime
from tunelab.pipeline.telemetry import (
    MemoryTracker,
    PhaseTimer,
    ProgressLog,
    engine_state_bytes,
)
from tunelab.presets import ModelShape, ModelSource


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

    @property
    def sequence_len(self) -> int:
        return self.config.ppo.max_prompt_len + self.config.ppo.max_answer_len

    def record_states(self, role: str, engine) -> None:
        """Model-state bytes of a live engine, read once per role. Trained engines are read
        between a backward and its step once the optimizer has stepped (Adam creates its
        moments at the first step): then params, grads and optimizer states all exist."""
        frozen = not any(p.requires_grad for p in engine.module.parameters())
        if (frozen or engine.global_steps >= 1) and role not in self.engine_states:
            self.engine_states[role] = engine_state_bytes(engine, self.runtime.accelerator)

    def timed_phase(self, name: str, step: int):
        """Time a step into `name`, or into `name_warmup` during the warm-up steps."""
        warm = step < self.config.warmup_steps
        return self.timer.phase(f"{name}_warmup" if warm else name)
