"""What every stage of a trial reads: configuration, runtime, data, models' sources, meters."""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.config import TrialConfig
from tunelab.pipeline.batching import EncodedData
from tunelab.pipeline.runtime import Runtime
from tunelab.pipeline.telemetry import MemoryTracker, PhaseTimer, ProgressLog
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

    @property
    def sequence_len(self) -> int:
        return self.config.ppo.max_prompt_len + self.config.ppo.max_answer_len

    def timed_phase(self, name: str, step: int):
        """Time a step into `name`, or into `name_warmup` during the warm-up steps."""
        warm = step < self.config.warmup_steps
        return self.timer.phase(f"{name}_warmup" if warm else name)
