"""Stopping hopeless trials early in multi-objective studies (pure).

Optuna's pruners compare one intermediate value and raise NotImplementedError for several
objectives. tunelab's rule for those: stop a running trial only when a finished trial beats
it, by more than `margin` (measurement noise on a shared machine), on *every* objective that
can already be judged — PPO throughput after warm-up (an intermediate value) and predicted
memory (known before launch). If any objective cannot be judged yet (reward gain, measured
memory), the trial runs to the end: nothing that could still reach the Pareto front is cut.

TrialPruning applies a spec's pruner to a running trial's progress records: the dominance rule
here, or Optuna's pruner through the callable the orchestrator gives it (report, then ask).
Before either, a constraint with a `stop_margin` stops a trial whose running value is already
past its bound by more than that margin (past_constraint): a pruner sees one value and not the
constraints, and a reward study's best-rewarded trials are often the ones that break them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from tunelab.metrics import RUNNING
from tunelab.spec import Constraint, Objective, PrunerSpec


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


def past_constraint(record: Mapping, constraints: Sequence[Constraint]) -> str | None:
    """Why a running trial's progress `record` is already past a constraint's stop line (the
    running value of its metric above max by more than stop_margin), or None."""
    for constraint in constraints:
        line = constraint.stop_line()
        running = RUNNING.get(constraint.metric)
        if line is not None and running is not None and record.get(running, line) > line:
            return (f"{running} {record[running]:.3g} is past the constraint "
                    f"{constraint.metric} <= {constraint.max:g} by more than "
                    f"{constraint.stop_margin:.0%}")  # fmt: skip
    return None


@dataclass
class TrialPruning:
    """Whether a running trial stops, one progress record at a time: past a constraint's stop
    line (spec.constraints), or by spec.pruner. `stopped_by` says why it stopped."""

    pruner: PrunerSpec
    objectives: Sequence[Objective]
    predicted: Mapping[str, float]  # the trial's memory prediction (judged before launch)
    finished: Sequence[Mapping[str, float]]  # finished trials' metrics (dominance)
    optuna_prunes: Callable[[float, int], bool]  # Optuna's pruner: report (value, step), ask
    constraints: Sequence[Constraint] = ()
    confirmation: bool = False  # a confirmation run measures noise: it never stops early
    intermediate: dict[str, float] = field(default_factory=dict)  # {step: value} so far
    stopped_by: str | None = None

    def should_stop(self, record: Mapping) -> bool:
        if self.confirmation:
            return False
        self.stopped_by = past_constraint(record, self.constraints)
        if self.stopped_by is None and self._pruner_stops(record):
            self.stopped_by = f"{self.pruner.type} pruner on {self.pruner.metric}"
        return self.stopped_by is not None

    def _pruner_stops(self, record: Mapping) -> bool:
        value = record.get(self.pruner.metric)
        if value is None or self.pruner.type == "none":
            return False
        self.intermediate[str(record["step"])] = value
        if self.pruner.type == "dominance":
            running = {**self.predicted, self.pruner.metric: value}
            return dominated(running, self.finished, self.objectives, self.pruner.margin)
        return self.optuna_prunes(value, record["step"])
