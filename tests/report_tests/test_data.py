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
    DISTRIBUTIONS,
    MIB,
    OOM,
    PRUNED_MEMORY,
    UNSUPPORTED,
    cpu_study,
    gpu_study,
    knobs,
)
from tunelab.records import OBJECTIVES_ATTR, TrialRecord, from_frozen_trial
from tunelab.report import data
from tunelab.report.build import _overview
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


def test_importance_needs_optunas_own_minimum():
    # PED-ANOVA keeps the best ceil(0.1 n) and asks for at least 5 of them: n >= 41.
    assert data.importance_minimum() == 41


def knob_study(count: int) -> optuna.Study:
    """`count` complete trials over the report studies' knobs; the ZeRO stage decides both
    throughput (up) and memory (down), the other knobs add little."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr(OBJECTIVES_ATTR, CPU_OBJECTIVES)
    for number in range(count):
        params = knobs(number % 4, ("none", "cpu")[number // 4 % 2], (0, 8)[number // 8 % 2],
                       (8, 16)[number // 16 % 2])  # fmt: skip
        values = [1000.0 * (1 + number % 4) + number % 5, 900.0 - 100 * (number % 4)]
        distributions = {k: DISTRIBUTIONS[k] for k in params}
        study.add_trial(create_trial(values=values, params=params, distributions=distributions))
    return study


def test_param_importances_per_objective():
    study = knob_study(41)
    objectives = objectives_of(study)
    importances = data.param_importances(study, objectives)
    assert [item.objective for item in importances] == [THROUGHPUT, HOST_PEAK]
    for item in importances:
        assert item.note == ""
        assert set(item.importances) == set(study.trials[0].params)
        assert sum(item.importances.values()) == pytest.approx(1)
        assert next(iter(item.importances)) == "actor.zero_stage"
    table = data.importance_table(importances)
    assert len(table) == 8 and list(table.columns) == ["objective", "param", "importance"]


def test_repeats_weigh_once_in_importance():
    study = knob_study(3)
    study.add_trial(create_trial(values=[3000.0, 700.0], params=study.trials[1].params,
                                 distributions=study.trials[1].distributions,
                                 user_attrs={"repeat_of": 1}))  # fmt: skip
    means = data.configuration_study(study, records_of(study))
    assert [t.values for t in means.trials] == [[1000.0, 900.0], [2500.5, 750.0],
                                                [3002.0, 700.0]]  # fmt: skip
    note = data.importance_obstacle(records_of(study), objectives_of(study), 0)
    assert note.endswith("needs at least 41 configurations (5 in its top 10%), this study has 3")


def small_study(params: list[dict], values: list[float]) -> optuna.Study:
    study = optuna.create_study(directions=["maximize"])
    choices = CategoricalDistribution(["a", "b"])
    for point, value in zip(params, values, strict=True):
        distributions = dict.fromkeys(point, choices)
        study.add_trial(create_trial(params=point, distributions=distributions, values=[value]))
    study.add_trial(
        create_trial(state=TrialState.FAIL, params={"k": "b"}, distributions={"k": choices})
    )
    return study


TOO_FEW = ("too few complete trials for importance: Optuna's PED-ANOVA needs at least 41 "
           "configurations (5 in its top 10%), this study has ")  # fmt: skip


@pytest.mark.parametrize(
    ("params", "values", "note"),
    [
        ([], [], TOO_FEW + "0"),
        ([{"k": "a"}] * 7, [float(v) for v in range(7)], TOO_FEW + "7"),
        (
            [{"k": "a"}] * 41,
            [float(v) for v in range(41)],
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
    assert list(frame.columns) == ["baseline", *data.TIMED_PHASES]
    assert frame.loc[4, list(data.TIMED_PHASES)].tolist() == pytest.approx(
        [0.54, 0.64, 0.74, 0.84, 0.94]
    )
    assert frame.loc[0, "baseline"] == BASELINE


def test_ppo_curves_per_step_and_without_gold(cpu):
    _, records, _ = cpu
    frame = data.ppo_curves(records, [4, 0])
    assert len(frame) == 2 * 3 * 20  # score, gold, KL
    gold = frame[(frame["number"] == 4) & (frame["series"] == "ppo/gold")]
    assert gold["step"].tolist() == list(range(20))
    assert gold["value"].iloc[-1] == pytest.approx(0.26 + 0.014 * 19)
    no_gold = record(0, series={"ppo/score": [1.0, 2.0]})
    assert data.ppo_curves([no_gold], [0])["series"].tolist() == ["ppo/score"] * 2
    kl = frame[(frame["number"] == 0) & (frame["series"] == "ppo/kl")]
    assert kl["value"].tolist() == pytest.approx([0.1 * s for s in range(20)])


def test_ppo_curves_of_a_repeated_configuration_are_means_with_sd():
    runs = [record(0, series={"ppo/kl": [0.0, 1.0]}),
            record(1, series={"ppo/kl": [0.0, 3.0]}, repeat_of=0)]  # fmt: skip
    frame = data.ppo_curves(runs, [0])
    assert frame["value"].tolist() == [0.0, 2.0] and frame["runs"].tolist() == [2, 2]
    assert frame["sd"].tolist() == pytest.approx([0.0, math.sqrt(2)])


def test_sample_answers_of_the_top_trials_when_recorded():
    sample = {"prompt": "p", "answer": "a", "gold": 1.0, "score": 0.5}
    runs = [record(0, samples=[sample] * 5), record(1)]
    frame = data.sample_answers(runs, [0, 1], per_trial=2)
    assert frame.to_dict("records") == [{"number": 0, **sample}] * 2
    assert data.sample_answers([record(1)], [1]).empty


def test_ppo_curves_place_a_thinned_series_at_its_steps():
    # 1000 PPO steps stored as 200 points, every 5th (tunelab.study thins long series).
    thinned = record(0, series={"ppo/score": [float(s) for s in range(0, 1000, 5)]},
                     metrics={"ppo/steps": 1000})  # fmt: skip
    frame = data.ppo_curves([thinned], [0])
    assert frame["step"].tolist() == list(range(0, 1000, 5))
    assert (frame["step"] == frame["value"]).all()
    assert data.series_steps(3, 3) == [0, 1, 2]
    assert data.series_steps(3, 10) == [0, 3, 6]


def test_stage_memory_compares_with_host_rss_on_the_cpu_and_device_on_a_gpu(cpu):
    _, records, _ = cpu
    frame = data.stage_memory(records)
    assert len(frame) == 7 * len(data.TIMED_PHASES)  # the complete trials
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


def test_stage_sources_count_trained_given_and_reused_stages():
    records = [
        record(0, metrics={"x/y": 1.0}, config={"sft": {"steps": 40}, "rm": {"steps": 40}}),
        record(1, metrics={"sft/reused": 1, "rm/reused": 1, "ppo/start_reused": 1},
               config={"sft": {"steps": 40}, "rm": {"steps": 40}}),
        record(2, metrics={"rm/reused": 1}, config={"sft": {"steps": 0}, "rm": {"steps": 40}}),
        record(3, state="PRUNED", status="pruned_memory"),  # never launched
    ]  # fmt: skip
    assert data.stage_sources(records) == {
        "sft": {"trained": 1, "given": 1, "reused": 1},
        "rm": {"trained": 1, "given": 0, "reused": 2},
        "ppo_start": {"reused": 1},
    }
    assert _overview(records, []).endswith(
        " Stages: SFT trained in 1, given in 1, reused in 1; RM trained in 1, reused in 2; "
        "PPO's start evaluation reused in 1 (launched trials)."
    )
