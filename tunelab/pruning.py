"""Stopping hopeless trials early in multi-objective studies (pure).

Optuna's pruners compare one intermediate value and raise NotImplementedError for several
objectives. tunelab's rule for those: stop a running trial only when a finished trial beats
it, by more than `margin` (measurement noise on a shared machine), on *every* objective that
can already be judged — PPO throughput after warm-up (an intermediate value) and predicted
memory (known before launch). If any objective cannot be judged yet (reward gain, measured
memory), the trial runs to the end: nothing that could still reach the Pareto front is cut.

TrialPruning applies a spec's pruner to a running trial's progress records: the dominance rule
here, or Optuna's pruner through the callable the orchestrator gives it (report, then ask).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from tunelab.spec import Objective, PrunerSpec


def beats(finished: float, running: float, direction: str, margin: float) -> bool:
    """`finished` better than `running` by more than a relative `margin`."""
    if direction == "maximize":
        return finished > running * (1 + margin) if running >= 0 else finished > running
    return finished < running * (1 - margin) if running >= 0 else finished < running


def dominated(
    running: Mapping[str, float],
    finished: Sequence[Mapping[str, float]],
    objectives: Sequence[Objective],
    margin: float,
) -> bool:
    """True when some finished trial beats `running` on every objective (all judged early)."""
    if not all(o.metric in running for o in objectives):
        return False
    return any(
        all(
            o.metric in done and beats(done[o.metric], running[o.metric], o.direction, margin)
            for o in objectives
        )
        for done in finished
    )


@dataclass
class TrialPruning:
    """Whether a running trial stops, one progress record at a time (spec.pruner)."""

    pruner: PrunerSpec
    objectives: Sequence[Objective]
    predicted: Mapping[str, float]  # the trial's memory prediction (judged before launch)
    finished: Sequence[Mapping[str, float]]  # finished trials' metrics (dominance)
    optuna_prunes: Callable[[float, int], bool]  # Optuna's pruner: report (value, step), ask
    intermediate: dict[str, float] = field(default_factory=dict)  # {step: value} so far

    def should_stop(self, record: Mapping) -> bool:
        value = record.get(self.pruner.metric)
        if value is None or self.pruner.type == "none":
            return False
        self.intermediate[str(record["step"])] = value
        if self.pruner.type == "dominance":
            running = {**self.predicted, self.pruner.metric: value}
            return dominated(running, self.finished, self.objectives, self.pruner.margin)
        return self.optuna_prunes(value, record["step"])
