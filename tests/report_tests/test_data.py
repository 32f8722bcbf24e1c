"""The report tables, with exact values, on real Optuna studies (tests/report_tests/studies.py)."""

from __future__ import annotations

import math

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from tests.report_tests.studies import (
    BASELINE,
    CPU_OBJECTIVES,
    MIB,
    OOM,
    PRUNED_MEMORY,
    UNSUPPORTED,
    cpu_study,
    gpu_study,
)
from tunelab.records import OBJECTIVES_ATTR, TrialRecord, from_frozen_trial
from tunelab.report import data
from tunelab.spec import Objective

optuna.logging.set_verbosity(optuna.logging.WARNING)
THROUGHPUT, HOST_PEAK = data.THROUGHPUT, data.HOST_PEAK


def records_of(study: optuna.Study) -> list[TrialRecord]:
    return [from_frozen_trial(t) for t in study.trials]


def objectives_of(study: optuna.Study) -> list[Objective]:
    return data.objectives_from(study.user_attrs, [d.name.lower() for d in study.directions])


@pytest.fixture(scope="module")
def cpu():
    study = cpu_study()
    return study, records_of(study), objectives_of(study)


def test_objectives_from_the_study_attr_else_numbered_directions():
    assert data.objectives_from({OBJECTIVES_ATTR: CPU_OBJECTIVES}, ["maximize", "minimize"]) == [
        Objective(THROUGHPUT, "maximize"),
        Objective(HOST_PEAK, "minimize"),
    ]
    assert data.objectives_from({}, ["minimize"]) == [Objective("value 0", "minimize")]


def test_knob_reads_params_then_the_nested_config(cpu):
    _, records, _ = cpu
    assert data.knob(records[4], "actor.lora_rank") == 8  # a param
    assert data.knob(records[4], "actor.offload_params") == "none"  # from the config
    assert data.knob(records[4], "precision") == "bf16"
    assert data.knob(records[4], "actor.no_such_knob") is None


def test_category_from_offload_and_lora(cpu):
    _, records, _ = cpu
    assert [data.category(records[n]) for n in (0, 1, 2, 5)] == [
        "plain",
        "offload",
        "lora",
        "lora+offload",
    ]


def test_headline_best_feasible_trial_and_gain_over_the_baseline(cpu):
    _, records, objectives = cpu
    frame = data.headline(records, objectives).set_index("objective")
    throughput = frame.loc[THROUGHPUT]
    # Trial 9 has 6000 tokens/s but violates its constraint: not the best.
    assert throughput["trial"] == 4
    assert throughput["value"] == 5213
    assert throughput["params"] == (
        "actor.zero_stage=2, actor.offload_optimizer=none, actor.lora_rank=8, batch.train_micro=8"
    )
    assert (throughput["baseline"], throughput["baseline_trial"]) == (BASELINE, 0)
    assert throughput["baseline_value"] == 2831
    assert throughput["ratio"] == pytest.approx(5213 / 2831)
    assert throughput["difference"] == 5213 - 2831
    memory = frame.loc[HOST_PEAK]
    assert (memory["trial"], memory["value"]) == (5, 480 * MIB)
    assert memory["change"] == pytest.approx(480 / 600 - 1)  # 20% less


def record(number: int, **fields) -> TrialRecord:
    """A hand-made record for the corner cases the studies do not have."""
    fields = {"state": "COMPLETE", "status": "ok", "reason": "", "values": (1.0,), **fields}
    return TrialRecord(number=number, params={"x": number}, **fields)


def test_headline_first_baseline_by_number_and_failed_baseline():
    objectives = [Objective("ppo/gold_gain", "maximize")]
    records = [
        record(2, values=(0.5,), baseline="second"),
        record(1, state="FAIL", status="oom", values=None, baseline="first"),
        record(3, values=(0.7,)),
    ]
    row = data.headline(records, objectives).iloc[0]
    assert (row["trial"], row["baseline"], row["baseline_trial"]) == (3, "first", 1)
    assert row["baseline_status"] == "oom"
    assert math.isnan(row["baseline_value"]) and math.isnan(row["ratio"])


def test_headline_without_a_ratio_when_the_baseline_is_not_positive():
    objectives = [Objective("ppo/gold_gain", "maximize")]
    records = [record(0, values=(-0.1,), baseline="b"), record(1, values=(0.3,))]
    row = data.headline(records, objectives).iloc[0]
    assert math.isnan(row["ratio"])
    assert row["difference"] == pytest.approx(0.4)


def test_headline_without_baseline_or_complete_trial():
    objectives = [Objective(THROUGHPUT, "maximize")]
    row = data.headline([record(0, state="FAIL", values=None)], objectives).iloc[0]
    assert pd.isna(row["trial"]) and math.isnan(row["value"])
    assert row["baseline"] is None


def test_pareto_points_front_categories_and_unmeasured_trials(cpu):
    _, records, _ = cpu
    points = data.pareto_points(records, data.memory_metric(records)).set_index("number")
    assert sorted(points.index[points["pareto"]]) == [1, 2, 4, 5, 10]
    # Trial 9 dominates in throughput but is infeasible; failed and pruned are not measured.
    assert points.loc[9, "measured"] and not points.loc[9, "pareto"]
    assert sorted(points.index[~points["measured"]]) == [3, 6, 7, 8]
    assert points.loc[4, ["zero_stage", "category", "tokens_per_s"]].tolist() == [2, "lora", 5213]
    assert points.loc[4, "memory_bytes"] == 700 * MIB
    assert points.loc[7, "status"] == "pruned_memory"
    assert points.loc[7, "predicted_bytes"] == 16 * MIB  # predicted before it was pruned


def test_pareto_mask_keeps_ties_and_drops_dominated_points():
    memory = [1.0, 2.0, 2.0, 3.0, 1.0]
    throughput = [10.0, 20.0, 20.0, 15.0, 5.0]
    assert data.pareto_mask(memory, throughput) == [True, True, True, False, False]
    assert data.pareto_mask([], []) == []


def test_memory_metric_prefers_device_memory():
    cpu_records, gpu_records = records_of(cpu_study()), records_of(gpu_study())
    assert data.memory_metric(cpu_records) == data.HOST_PEAK
    assert data.memory_metric(gpu_records) == data.DEVICE_PEAK
    assert data.common_memory_metric([gpu_records, gpu_records]) == data.DEVICE_PEAK
    assert data.common_memory_metric([cpu_records, gpu_records]) == data.HOST_PEAK


def test_param_importances_per_objective(cpu):
    study, _, objectives = cpu
    importances = data.param_importances(study, objectives)
    assert [item.objective for item in importances] == [THROUGHPUT, HOST_PEAK]
    for item in importances:
        assert item.note == ""
        assert set(item.importances) == set(study.trials[0].params)
        assert sum(item.importances.values()) == pytest.approx(1)
        # In this study the ZeRO stage decides both throughput and memory.
        assert next(iter(item.importances)) == "actor.zero_stage"
    table = data.importance_table(importances)
    assert len(table) == 8 and list(table.columns) == ["objective", "param", "importance"]


def small_study(params: list[dict], values: list[float]) -> optuna.Study:
    study = optuna.create_study(directions=["maximize"])
    choices = CategoricalDistribution(["a", "b"])
    for knobs, value in zip(params, values, strict=True):
        distributions = dict.fromkeys(knobs, choices)
        study.add_trial(create_trial(params=knobs, distributions=distributions, values=[value]))
    study.add_trial(
        create_trial(state=TrialState.FAIL, params={"k": "b"}, distributions={"k": choices})
    )
    return study


@pytest.mark.parametrize(
    ("params", "values", "note"),
    [
        ([], [], "needs at least 2 complete trials (this study has 0)"),
        ([{"k": "a"}], [1.0], "needs at least 2 complete trials (this study has 1)"),
        (
            [{"k": "a"}, {"k": "a"}, {"k": "a"}],
            [1.0, 2.0, 3.0],
            "no searched knob takes more than one value among the complete trials",
        ),
    ],
)
def test_param_importances_says_why_it_cannot(params, values, note):
    study = small_study(params, values)
    importances = data.param_importances(study, [Objective("perf/x_tokens_per_s", "maximize")])
    assert importances == [data.Importance("perf/x_tokens_per_s", {}, note)]


def test_top_trials_by_the_first_objective_then_the_baseline(cpu):
    _, records, objectives = cpu
    assert data.top_trials(records, objectives, 3) == [4, 2, 10, 0]
    assert data.top_trials(records, objectives, 5) == [4, 2, 10, 0, 1]  # baseline among them
    assert data.top_trials(records, [], 5) == []


def test_time_breakdown_seconds_per_stage(cpu):
    _, records, _ = cpu
    frame = data.time_breakdown(records, [4, 0]).set_index("number")
    assert list(frame.columns) == ["baseline", *data.STAGES]
    assert frame.loc[4, list(data.STAGES)].tolist() == pytest.approx(
        [0.54, 0.64, 0.74, 0.84, 0.94]
    )
    assert frame.loc[0, "baseline"] == BASELINE


def test_reward_curves_per_step_and_without_gold(cpu):
    _, records, _ = cpu
    frame = data.reward_curves(records, [4, 0])
    assert len(frame) == 2 * 2 * 20
    gold = frame[(frame["number"] == 4) & (frame["series"] == "ppo/gold")]
    assert gold["step"].tolist() == list(range(20))
    assert gold["value"].iloc[-1] == pytest.approx(0.26 + 0.014 * 19)
    no_gold = record(0, series={"ppo/score": [1.0, 2.0]})
    assert data.reward_curves([no_gold], [0])["series"].tolist() == ["ppo/score"] * 2


def test_reward_curves_place_a_thinned_series_at_its_steps():
    # 1000 PPO steps stored as 200 points, every 5th (tunelab.study thins long series).
    thinned = record(0, series={"ppo/score": [float(s) for s in range(0, 1000, 5)]},
                     metrics={"ppo/steps": 1000})  # fmt: skip
    frame = data.reward_curves([thinned], [0])
    assert frame["step"].tolist() == list(range(0, 1000, 5))
    assert (frame["step"] == frame["value"]).all()
    assert data.series_steps(3, 3) == [0, 1, 2]
    assert data.series_steps(3, 10) == [0, 3, 6]


def test_stage_memory_compares_with_host_rss_on_the_cpu_and_device_on_a_gpu(cpu):
    _, records, _ = cpu
    frame = data.stage_memory(records)
    assert len(frame) == 7 * len(data.STAGES)  # the complete trials
    assert set(frame["measured"]) == {"host RSS"}
    row = frame[(frame["number"] == 4) & (frame["stage"] == "ppo_train")].iloc[0]
    assert (row["predicted_bytes"], row["measured_bytes"]) == (13 * MIB, 700 * MIB)
    assert row["ratio"] == pytest.approx(700 / 13)
    gpu = data.stage_memory(records_of(gpu_study()))
    assert set(gpu["measured"]) == {"device allocated"}


def test_model_states_memory_and_ratio_summary(cpu):
    _, records, _ = cpu
    frame = data.model_states_memory(records)
    assert len(frame) == 7 * len(data.ENGINES)
    row = frame[(frame["number"] == 1) & (frame["engine"] == "actor")].iloc[0]
    assert row["ratio"] == pytest.approx((2_390_016 + 8) / 2_390_016)
    summary = data.ratio_summary(frame, "engine").set_index("engine")
    assert list(summary.index) == list(data.ENGINES)
    assert summary.loc["actor", "trials"] == 7
    assert summary.loc["actor", "min"] == 1
    assert summary.loc["actor", "max"] == pytest.approx((2_390_016 + 16) / 2_390_016)


def test_failures_grouped_by_status_and_reason(cpu):
    _, records, _ = cpu
    assert data.failures(records).to_dict("records") == [
        {"state": "FAIL", "status": "oom", "reason": OOM, "count": 2, "trials": (3, 8)},
        {"state": "FAIL", "status": "unsupported", "reason": UNSUPPORTED, "count": 1,
         "trials": (6,)},
        {"state": "PRUNED", "status": "pruned_memory", "reason": PRUNED_MEMORY, "count": 1,
         "trials": (7,)},
    ]  # fmt: skip
    assert data.failures([record(0, values=(1.0,))]).empty


def test_trial_table_rows_columns_and_cells(cpu):
    _, records, objectives = cpu
    table = data.trial_table(records, objectives, ["rm/eval_accuracy", THROUGHPUT])
    assert list(table.columns) == [
        "number", "state", "status", "baseline", "feasible", "actor.zero_stage",
        "actor.offload_optimizer", "actor.lora_rank", "batch.train_micro", THROUGHPUT,
        HOST_PEAK, "rm/eval_accuracy", "wall_s", "reason",
    ]  # fmt: skip
    assert table["number"].tolist() == list(range(11))
    row = table.set_index("number").loc[4]
    assert (row[THROUGHPUT], row[HOST_PEAK], row["rm/eval_accuracy"]) == (
        5213,
        700 * MIB,
        0.921875,
    )
    failed = table.set_index("number").loc[3]
    assert (failed["status"], failed["reason"]) == ("oom", OOM)
    assert math.isnan(failed[THROUGHPUT])
    assert table.set_index("number").loc[9, "feasible"] == False  # noqa: E712
