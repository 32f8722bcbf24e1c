"""Comparison tables over two real studies (a CPU smoke study and a GPU study)."""

from __future__ import annotations

import optuna
import pytest

from tests.report_tests.studies import MIB, cpu_study, gpu_study
from tunelab.records import from_frozen_trial
from tunelab.report import compare, data
from tunelab.spec import Objective

optuna.logging.set_verbosity(optuna.logging.WARNING)
THROUGHPUT = data.THROUGHPUT


def study_data(study: optuna.Study, name: str) -> compare.StudyData:
    return compare.StudyData(
        name,
        [from_frozen_trial(t) for t in study.trials],
        data.objectives_from(study.user_attrs, [d.name.lower() for d in study.directions]),
    )


@pytest.fixture(scope="module")
def studies():
    return [study_data(cpu_study(), "smoke"), study_data(gpu_study(), "h200")]


def test_unique_names_number_repeats():
    assert compare.unique_names(["a", "b", "a", "a"]) == ["a", "b", "a (2)", "a (3)"]


def test_studies_of_one_name_are_labelled_by_their_run_folders():
    assert compare.study_labels(["smoke", "smoke"], ["h100", "a100"]) == ["h100", "a100"]
    assert compare.study_labels(["smoke", "h200"], ["h100", "a100"]) == ["smoke", "h200"]
    # By storage URL (no folder): their names, numbered; folders alike: numbered too.
    assert compare.study_labels(["a", "a", "b"], ["x", None, None]) == ["x", "a", "b"]
    assert compare.study_labels(["s", "s"], [None, None]) == ["s", "s (2)"]
    assert compare.study_labels(["s", "s"], ["run", "run"]) == ["run", "run (2)"]


def test_shared_objectives_match_metric_and_direction(studies):
    assert compare.shared_objectives(studies) == [Objective(THROUGHPUT, "maximize")]
    assert compare.shared_objectives(studies[:1]) == studies[0].objectives
    assert compare.shared_objectives([]) == []


def test_study_summary_counts_and_best_shared_values(studies):
    summary = compare.study_summary(studies, compare.shared_objectives(studies))
    assert summary.to_dict("records") == [
        {"study": "smoke", "trials": 11, "ok": 7, "failed": 3, "pruned": 1, THROUGHPUT: 5213},
        {"study": "h200", "trials": 4, "ok": 3, "failed": 1, "pruned": 0, THROUGHPUT: 41000},
    ]


def test_best_configs_per_study_on_shared_objectives_else_their_own(studies):
    best = compare.best_configs(studies, compare.shared_objectives(studies))
    assert best[["study", "objective", "trial"]].values.tolist() == [
        ["smoke", THROUGHPUT, 4],
        ["h200", THROUGHPUT, 0],
    ]
    own = compare.best_configs(studies, [])
    assert own[["study", "objective", "trial"]].values.tolist() == [
        ["smoke", THROUGHPUT, 4],
        ["smoke", data.HOST_PEAK, 5],
        ["h200", THROUGHPUT, 0],
        ["h200", "ppo/gold_gain", 3],
    ]


def test_comparison_points_keep_each_study_front(studies):
    points = compare.comparison_points(studies, data.HOST_PEAK)
    front = points[points["pareto"]]
    assert sorted(front[front["study"] == "smoke"]["number"]) == [1, 2, 4, 5, 10]
    assert sorted(front[front["study"] == "h200"]["number"]) == [0, 1]
    assert points.loc[points["study"] == "h200", "memory_bytes"].max() == 3 * 1024 * MIB


def test_comparison_trials_have_every_trial_and_metric(studies):
    trials = compare.comparison_trials(studies)
    assert trials.columns[0] == "study"
    assert trials["study"].tolist() == ["smoke"] * 11 + ["h200"] * 4
    assert {"ppo/gold_gain", data.DEVICE_PEAK, "mem/ppo_train/peak_host_rss_bytes"} <= set(trials)
