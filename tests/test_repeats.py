"""Repeats of a configuration: grouping, mean ± 95% interval, the noise verdict, the plan."""

from __future__ import annotations

import math
import statistics

import pytest

from tunelab.records import TrialRecord
from tunelab.repeats import (
    Verdict,
    configurations,
    estimate,
    ranked_configurations,
    repeat_seed,
    repeats_needed,
    t_975,
    verdict,
)


def run(number, value, *, repeat_of=None, state="COMPLETE", status="ok", baseline=None,
        feasible=True):  # fmt: skip
    values = (value if isinstance(value, tuple) else (value,)) if state == "COMPLETE" else None
    return TrialRecord(number=number, state=state, status=status, reason="", params={},
                       values=values, baseline=baseline, repeat_of=repeat_of,
                       feasible=feasible)  # fmt: skip


def test_estimate_mean_sd_and_student_interval():
    values = [0.176, 0.282, 0.27, 0.21, 0.261, 0.241]  # gold gains of six runs
    found = estimate(values)
    assert found.n == 6
    assert found.mean == pytest.approx(0.24)
    assert found.sd == pytest.approx(statistics.stdev(values))
    assert found.half_width == pytest.approx(2.571 * found.sd / math.sqrt(6))
    assert found.low == found.mean - found.half_width
    assert found.high == found.mean + found.half_width
    single = estimate([5.0])
    assert single.mean == 5.0 and single.n == 1 and math.isnan(single.half_width)
    assert not single.repeated and math.isnan(estimate([]).mean)


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 30):
        assert t_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)
    assert t_975(200) == 1.96


def test_verdict_needs_disjoint_intervals_from_repeated_runs():
    baseline = estimate([0.18, 0.24, 0.30])
    assert verdict(estimate([0.20, 0.35, 0.27]), baseline) == Verdict.WITHIN
    assert verdict(estimate([0.60, 0.62, 0.61]), baseline) == Verdict.OUTSIDE
    assert verdict(estimate([0.05, 0.04, 0.06]), baseline) == Verdict.OUTSIDE  # worse, clearly
    assert verdict(estimate([0.60]), baseline) == Verdict.UNKNOWN  # one run: noise unknown


def test_repeats_group_with_their_original():
    records = [run(0, 1.0, baseline="b"), run(1, 2.0), run(2, 1.2, repeat_of=0),
               run(3, 1.9, repeat_of=1), run(4, 0.0, repeat_of=9)]  # fmt: skip
    groups = configurations(records)
    assert [(c.number, [r.number for r in c.runs]) for c in groups] == [
        (0, [0, 2]), (1, [1, 3]), (4, [4])  # an orphan repeat stands alone
    ]
    assert groups[0].objective(0).mean == pytest.approx(1.1)


def test_confirmed_means_decide_the_best_not_a_lucky_single_run():
    records = [
        run(0, 5.0), run(1, 9.0),  # #1: a lucky single run, never repeated
        run(2, 8.0), run(3, 6.0, repeat_of=2), run(4, 7.0, repeat_of=2),  # mean 7
        run(5, 6.5), run(6, 6.5, repeat_of=5, state="FAIL", status="oom"),  # one complete run
        run(7, 9.5), run(8, 9.4, repeat_of=7, feasible=False),  # infeasible in one run
    ]
    best = ranked_configurations(records, 0, "maximize")
    assert [(c.number, e.n) for c, e in best] == [(2, 3)]
    assert ranked_configurations(records[:2], 0, "minimize")[0][0].number == 0


def test_plan_repeats_top_k_per_objective_and_the_baseline():
    records = [
        run(0, 1.0, baseline="dschat"), run(1, 4.0), run(2, 3.0), run(3, 2.0),
        run(4, 0.0, state="FAIL", status="oom"),
        run(5, 3.9, repeat_of=1), run(6, 0.0, repeat_of=2, state="WAITING", status="waiting"),
        run(7, 0.0, repeat_of=2, state="FAIL", status="interrupted"),  # enqueued again by Optuna
    ]  # fmt: skip
    # Top 2: #1 (one repeat done), #2 (one waiting); the baseline #0.
    assert repeats_needed(records, ["maximize"], top_k=2, repeats=3) == {1: 1, 2: 1, 0: 2}
    two = [run(0, (1.0, 1.0), baseline="dschat"), run(1, (4.0, 5.0)), run(2, (3.0, 0.5))]
    assert repeats_needed(two, ["maximize", "minimize"], 1, 2) == {1: 1, 2: 1, 0: 1}
    assert repeats_needed(records, ["maximize"], top_k=0, repeats=3) == {}


def test_each_repeat_has_its_own_seed():
    seeds = {repeat_seed(1234, ordinal) for ordinal in range(1, 5)}
    assert len(seeds) == 4 and 1234 not in seeds
    assert repeat_seed(2**32 - 1, 1) == 0
