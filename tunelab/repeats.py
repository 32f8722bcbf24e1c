"""Repeated runs of one configuration: grouping, mean ± confidence interval, and the verdict
whether a gain lies outside noise (pure; no Optuna, no torch).

A study's spec may ask for confirmation runs (`confirm: {top_k, repeats}`): when the trial
budget is used, the `top_k` best configurations per objective (by their single run) and the
baseline run again, each repeat a new Optuna trial with the same params, its own seed and the
user attr `repeat_of` = the original trial's number, until each has `repeats` runs. Reports and
export then judge configurations by their mean, with the 95% interval mean ± t·sd/√n
(Student's t, n - 1 degrees of freedom).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from tunelab.config import SEED_LIMIT
from tunelab.records import Status, TrialRecord, is_finite, ranked

# Two-sided 95% quantiles of Student's t, t_{0.975, df} for df = 1..30 (any statistics table,
# e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2); beyond 30 the normal's 1.96.
_T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with `df` >= 1 degrees of freedom."""
    return _T_975[df - 1] if df <= len(_T_975) else 1.96


class Estimate(NamedTuple):
    """Mean of n runs, their sample sd, and the 95% interval's half-width t·sd/√n (NaN below
    two runs: one run says nothing about its noise)."""

    mean: float
    sd: float
    n: int
    half_width: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def repeated(self) -> bool:
        return self.n >= 2


def estimate(values: Sequence[float]) -> Estimate:
    """Mean, sd (n - 1) and 95% half-width of `values` (NaN mean when empty)."""
    n = len(values)
    if n == 0:
        return Estimate(math.nan, math.nan, 0, math.nan)
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, math.nan, 1, math.nan)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Estimate(mean, sd, n, t_975(n - 1) * sd / math.sqrt(n))


class Verdict:
    """How a best configuration compares with the baseline, given their intervals."""

    OUTSIDE = "outside noise"  # both repeated, the 95% intervals do not overlap
    WITHIN = "within noise"  # both repeated, the intervals overlap: no gain shown
    UNKNOWN = "noise not measured"  # a side ran once


def verdict(best: Estimate, baseline: Estimate) -> str:
    """OUTSIDE when the two 95% intervals are disjoint, WITHIN when they overlap, UNKNOWN
    unless both sides ran at least twice. (Disjoint 95% intervals is a conservative test: it
    implies a difference at well under the 5% level.)"""
    if not (best.repeated and baseline.repeated):
        return Verdict.UNKNOWN
    if best.low > baseline.high or best.high < baseline.low:
        return Verdict.OUTSIDE
    return Verdict.WITHIN


class Configuration(NamedTuple):
    """One configuration: its original trial and every run of it (original first, then the
    repeats by number), whatever their state."""

    number: int  # the original trial's
    runs: tuple[TrialRecord, ...]

    @property
    def original(self) -> TrialRecord:
        return self.runs[0]

    @property
    def complete(self) -> list[TrialRecord]:
        return [r for r in self.runs if r.state == "COMPLETE"]

    @property
    def feasible(self) -> bool:
        """Every complete run met the study's constraints."""
        return all(r.feasible for r in self.complete)

    def objective(self, index: int) -> Estimate:
        """The estimate of objective `index` over the complete runs."""
        return estimate([r.values[index] for r in self.complete
                         if r.values and is_finite(r.values[index])])  # fmt: skip

    def metric(self, name: str) -> Estimate:
        """The estimate of a metric over the complete runs that have it."""
        return estimate([r.metrics[name] for r in self.complete if is_finite(r.metrics.get(name))])


def configurations(records: Sequence[TrialRecord]) -> list[Configuration]:
    """Trials grouped by configuration (a repeat joins its `repeat_of` trial), by original
    number; a repeat whose original is absent counts as its own configuration."""
    numbers = {r.number for r in records}
    groups: dict[int, list[TrialRecord]] = {}
    for r in sorted(records, key=lambda r: r.number):
        key = r.repeat_of if r.repeat_of in numbers else r.number
        groups.setdefault(key, []).append(r)
    return [Configuration(number, tuple(runs)) for number, runs in sorted(groups.items())]


def ranked_configurations(
    records: Sequence[TrialRecord], index: int, direction: str
) -> list[tuple[Configuration, Estimate]]:
    """Configurations by their mean on objective `index`, best first (ties by number): those
    with a complete run, feasible in every run. When any was repeated, only repeated ones
    compete: a lucky single run does not beat a confirmed mean."""
    sign = -1 if direction == "maximize" else 1
    eligible = [(c, c.objective(index)) for c in configurations(records) if c.feasible]
    eligible = [(c, e) for c, e in eligible if e.n > 0]
    if any(e.repeated for _, e in eligible):
        eligible = [(c, e) for c, e in eligible if e.repeated]
    return sorted(eligible, key=lambda pair: (sign * pair[1].mean, pair[0].number))


def reference_baseline(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The baseline gains are measured against: the first original trial naming a baseline."""
    baselines = [r for r in records if r.baseline and r.repeat_of is None]
    return min(baselines, key=lambda r: r.number) if baselines else None


def repeats_needed(
    records: Sequence[TrialRecord], directions: Sequence[str], top_k: int, repeats: int
) -> dict[int, int]:
    """Original trial number -> repeats still to enqueue so that it has `repeats` runs: the
    `top_k` best originals per objective by their single run, and the reference baseline when
    it completed. A repeat waiting, running or finished counts (an interrupted one does not:
    Optuna enqueues it again)."""
    if top_k <= 0:
        return {}
    originals = [r for r in records if r.repeat_of is None]
    chosen: list[int] = []
    for index, direction in enumerate(directions):
        chosen += [r.number for r in ranked(originals, index, direction)[:top_k]]
    baseline = reference_baseline(records)
    if baseline is not None and baseline.state == "COMPLETE":
        chosen.append(baseline.number)
    needed = {}
    for number in dict.fromkeys(chosen):
        have = sum(r.repeat_of == number and r.status != Status.INTERRUPTED for r in records)
        if repeats - 1 - have > 0:
            needed[number] = repeats - 1 - have
    return needed


def repeat_seed(seed: int, ordinal: int) -> int:
    """The seed of a configuration's `ordinal`-th repeat (1, 2, ...): distinct per repeat."""
    return (seed + ordinal) % SEED_LIMIT
