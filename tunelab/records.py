"""What a tunelab study keeps in its Optuna storage, and how to read it back (pure, no torch).

The orchestrator writes, reports and export read; nothing else touches the storage.

Study user attrs:
    "tunelab:spec"        the study spec as a mapping (tunelab.spec.StudySpec.to_dict())
    "tunelab:objectives"  [{"metric": ..., "direction": "maximize"|"minimize"}, ...]

Trial params: the searched knobs by dotted name ("actor.zero_stage"), values in spec order.
Trial user attrs (TrialAttr below): status (a Status value), reason, series (per step),
config (the full trial config), wall_s, out_dir, log, worker, "baseline" (its name) and "fixed"
(its overrides) for enqueued baseline trials, "repeat_of" (the original trial's number) for
confirmation runs (tunelab.repeats), "samples" (decoded answers from metrics.json, when the
trial wrote them), and "predicted": the flat memory prediction the orchestrator made before
launch, kept only when the trial recorded none itself (a trial that ran records
tunelab.memory.trial_prediction's `mem/.../predicted_*` among its metrics), so a trial holds
one prediction. Every metric is its own user attr, keyed by its namespaced name
("perf/ppo_e2e_tokens_per_s"), so optuna-dashboard and `study.trials_dataframe()` see one
numeric column per metric; a key holding "/" is a metric, TrialAttr names never do. The
study's metric names are set with `study.set_metric_names` (the objectives' metrics, in order).
Constraints go through Optuna's trial.set_constraint (feasible when <= 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Status(str, Enum):
    """Outcome of a trial as tunelab classifies it; stored as its plain string (`.value`).

    ok [Optuna COMPLETE]; oom, killed, unsupported, diverged, timeout, error, invalid [FAIL];
    pruned (stopped early), pruned_memory (predicted over budget, never launched) [PRUNED];
    interrupted [FAIL]: its orchestrator died or was stopped, or its heartbeat stopped; the
    same parameters are enqueued again (at most tunelab.storage.MAX_RETRY times; the reason
    says so). oom needs evidence (an out-of-memory error, the kernel's OOM-kill log line or the
    cgroup's OOM-kill counter); a trial ended by a signal without such evidence is `killed`.
    """

    OK = "ok"
    OOM = "oom"
    KILLED = "killed"
    UNSUPPORTED = "unsupported"
    DIVERGED = "diverged"
    TIMEOUT = "timeout"
    ERROR = "error"
    INVALID = "invalid"
    PRUNED = "pruned"
    PRUNED_MEMORY = "pruned_memory"
    INTERRUPTED = "interrupted"

    __str__ = str.__str__  # "ok" in messages, as the value it is stored as
    __format__ = str.__format__

    @property
    def optuna_state(self) -> str:
        """The name of the Optuna TrialState a trial with this status ends in."""
        if self is Status.OK:
            return "COMPLETE"
        return "PRUNED" if self in PRUNED_STATUSES else "FAIL"


PRUNED_STATUSES = (Status.PRUNED, Status.PRUNED_MEMORY)

# The pipeline's stages in order, and its DeepSpeed engines by role (metrics, reports and the
# DeepSpeed configs use these names: "sft/loss", "mem/actor/...", "actor.json").
STAGES = ("sft", "rm", "ppo")
ENGINES = ("sft", "rm", "actor", "critic", "reference", "reward")
TRAINED_ENGINES = ("sft", "rm", "actor", "critic")  # the ones with an optimizer


class TrialAttr:
    STATUS = "status"
    REASON = "reason"
    SERIES = "series"
    CONFIG = "config"
    PREDICTED = "predicted"
    WALL_S = "wall_s"
    OUT_DIR = "out_dir"
    LOG = "log"
    WORKER = "worker"
    BASELINE = "baseline"
    FIXED = "fixed"  # a baseline's config overrides, knobs included (those are not sampled)
    INTERMEDIATE = "intermediate"  # {step: value} of the pruning metric (multi-objective)
    REPEAT_OF = "repeat_of"  # a confirmation run: the number of the trial it repeats
    SAMPLES = "samples"  # decoded answers: [{prompt, answer, gold, score}, ...] when recorded


# Studies recorded before metrics were flat kept them all in this one attr; still read.
_NESTED_METRICS = "metrics"

SPEC_ATTR = "tunelab:spec"
OBJECTIVES_ATTR = "tunelab:objectives"


@dataclass(frozen=True)
class TrialRecord:
    """One trial as reports and export see it."""

    number: int
    state: str  # Optuna's: COMPLETE, FAIL, PRUNED, RUNNING, WAITING
    status: str
    reason: str
    params: dict[str, Any]
    values: tuple[float, ...] | None
    metrics: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[float]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)
    wall_s: float | None = None
    baseline: str | None = None
    out_dir: str | None = None
    feasible: bool = True
    repeat_of: int | None = None  # a confirmation run of that trial
    samples: list[dict[str, Any]] = field(default_factory=list)


def is_metric_key(key: str) -> bool:
    """Whether a trial user attr is a metric (namespaced names; TrialAttr names have no '/')."""
    return "/" in key


def metric_attrs(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The user attrs that record a trial's metrics: one per metric, under its own name (every
    name tunelab.metrics allows is namespaced, so none collides with a TrialAttr)."""
    return {name: value for name, value in metrics.items() if is_metric_key(name)}


def trial_metrics(user_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's metrics from its user attrs (the one reader: report, export, compare and the
    orchestrator's pruning all go through it)."""
    flat = {key: value for key, value in user_attrs.items() if is_metric_key(key)}
    return flat or dict(user_attrs.get(_NESTED_METRICS, {}))


def prediction_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The memory prediction among a trial's metrics (`mem/.../predicted_*`)."""
    return {name: value for name, value in metrics.items() if "/predicted_" in name}


def from_frozen_trial(trial) -> TrialRecord:
    """A TrialRecord from an optuna.trial.FrozenTrial (duck-typed: no optuna import here)."""
    attrs = trial.user_attrs
    state = trial.state.name
    metrics = trial_metrics(attrs)
    return TrialRecord(
        number=trial.number,
        state=state,
        status=attrs.get(TrialAttr.STATUS, state.lower()),
        reason=attrs.get(TrialAttr.REASON, ""),
        params=dict(trial.params),
        # Optuna gives a pruned trial its last intermediate value (e.g. the running reward-
        # model score): not the objective's value
        values=tuple(trial.values) if trial.values is not None and state == "COMPLETE" else None,
        metrics=metrics,
        series=attrs.get(TrialAttr.SERIES, {}),
        config=attrs.get(TrialAttr.CONFIG, {}),
        predicted=prediction_metrics(metrics) or attrs.get(TrialAttr.PREDICTED, {}),
        wall_s=attrs.get(TrialAttr.WALL_S),
        baseline=attrs.get(TrialAttr.BASELINE),
        out_dir=attrs.get(TrialAttr.OUT_DIR),
        feasible=all(c <= 0 for c in trial.constraints.values()),
        repeat_of=attrs.get(TrialAttr.REPEAT_OF),
        samples=attrs.get(TrialAttr.SAMPLES, []),
    )


def is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def ranked(records: Sequence[TrialRecord], index: int, direction: str) -> list[TrialRecord]:
    """COMPLETE, feasible trials with a finite value for objective `index`, best first (ties by
    trial number)."""
    sign = -1 if direction == "maximize" else 1
    eligible = [
        r
        for r in records
        if r.state == "COMPLETE" and r.feasible and r.values and is_finite(r.values[index])
    ]
    return sorted(eligible, key=lambda r: (sign * r.values[index], r.number))
