"""Report tables: pure functions of TrialRecords and the study's objectives (no drawing, no I/O).

Every figure and every table of a report is drawn or rendered from a frame built here, so the
numbers are tested without drawing. Only `param_importances` needs the Optuna study itself.
Trials are judged as configurations (tunelab.repeats): a trial and its confirmation runs.
"""

from __future__ import annotations

import inspect
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import optuna
import pandas as pd
from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

from tunelab.memory import STAGES as MEMORY_STAGES
from tunelab.records import (
    ENGINES,
    OBJECTIVES_ATTR,
    Status,
    TrialRecord,
    from_frozen_trial,
    is_finite,
)
from tunelab.repeats import (
    configurations,
    estimate,
    ranked_configurations,
    reference_baseline,
    verdict,
)
from tunelab.spec import Objective
from tunelab.stagecache import STAGES as REUSABLE_STAGES
from tunelab.stagecache import START, START_REUSED

TIMED_PHASES = ("sft", "rm", "ppo_generate", "ppo_experience", "ppo_train")
THROUGHPUT = "perf/ppo_e2e_tokens_per_s"
DEVICE_PEAK = "mem/peak_device_allocated_bytes"
HOST_PEAK = "mem/peak_host_rss_bytes"
PREDICTED_PEAK = "mem/predicted_device_peak_bytes"
# Reward-model score, gold reward (synthetic data), KL to the reference per PPO step.
CURVE_SERIES = ("ppo/score", "ppo/gold", "ppo/kl")
SAMPLE_FIELDS = ("prompt", "answer", "gold", "score")  # a trial's "samples" entries
PED_ANOVA_TOP_TRIALS = 5  # PedAnovaImportanceEvaluator's docstring: trials above its quantile
# The metrics the trial table shows (when any trial has them); trials.csv carries them all.
KEY_METRICS = (
    THROUGHPUT, DEVICE_PEAK, HOST_PEAK, PREDICTED_PEAK, "ppo/gold_gain", "ppo/score_gain",
    "ppo/kl_final", "rm/eval_accuracy", "sft/loss_final", "time/trial_s",
)  # fmt: skip
CATEGORIES = ("plain", "offload", "lora", "lora+offload")


def objectives_from(user_attrs: Mapping[str, Any], directions: Sequence[str]) -> list[Objective]:
    """The study's objectives from its "tunelab:objectives" attr; a study made elsewhere gets
    "value <i>" names with the study's `directions` ("maximize"/"minimize")."""
    stored = user_attrs.get(OBJECTIVES_ATTR)
    if stored:
        return [Objective(item["metric"], item["direction"]) for item in stored]
    return [Objective(f"value {index}", direction) for index, direction in enumerate(directions)]


def knob(record: TrialRecord, name: str) -> Any:
    """A knob's value by dotted name: the searched param, else the trial's full config."""
    if name in record.params:
        return record.params[name]
    node: Any = record.config
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def category(record: TrialRecord) -> str:
    """The actor's memory-saving technique: one of CATEGORIES."""
    lora = (knob(record, "actor.lora_rank") or 0) > 0
    offload = any(
        knob(record, f"actor.{name}") not in (None, "none", False)
        for name in ("offload_optimizer", "offload_params")
    )
    return CATEGORIES[2 * lora + offload]


def baseline_of(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The baseline trial gains are measured against (tunelab.repeats.reference_baseline)."""
    return reference_baseline(records)


def format_params(params: Mapping[str, Any]) -> str:
    """Knob values as one line, like "actor.zero_stage=2, precision=bf16" (spec order)."""
    return ", ".join(
        f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
        for name, value in params.items()
    )


def headline(records: Sequence[TrialRecord], objectives: Sequence[Objective]) -> pd.DataFrame:
    """Per objective: the best configuration by its mean over its runs (its original trial
    and confirmation runs), its knobs and its mean against the baseline configuration's.

    `runs` and `half_width` (95% interval: mean ± t·sd/√n, NaN for one run) for both sides;
    `verdict` (tunelab.repeats.Verdict) says whether the intervals show a difference.
    `ratio` (best / baseline) is set only when both values are positive, where a ratio means
    something; `change` = ratio - 1; `difference` = best - baseline always.
    """
    baseline = baseline_of(records)
    groups = {c.number: c for c in configurations(records)}
    rows = []
    for index, objective in enumerate(objectives):
        ranking = ranked_configurations(records, index, objective.direction)
        best, found = ranking[0] if ranking else (None, estimate([]))
        base = (groups[baseline.number].objective(index) if baseline is not None
                else estimate([]))  # fmt: skip
        value, base_value = found.mean, base.mean
        ratio = value / base_value if value >= 0 and base_value > 0 else math.nan
        rows.append({
            "objective": objective.metric, "direction": objective.direction,
            "trial": best.number if best else None, "value": value,
            "runs": found.n, "half_width": found.half_width,
            "params": format_params(best.original.params) if best else "",
            "baseline": baseline.baseline if baseline else None,
            "baseline_trial": baseline.number if baseline else None,
            "baseline_status": baseline.status if baseline else None,
            "baseline_value": base_value, "baseline_runs": base.n,
            "baseline_half_width": base.half_width, "verdict": verdict(found, base),
            "ratio": ratio, "change": ratio - 1, "difference": value - base_value,
        })  # fmt: skip
    frame = pd.DataFrame(rows)
    return frame.astype({"trial": "Int64", "baseline_trial": "Int64"}) if rows else frame


def memory_metric(records: Sequence[TrialRecord]) -> str:
    """The peak-memory metric to plot: device allocated (GPU) when any trial has it, else host
    RSS (which includes the process's baseline)."""
    return DEVICE_PEAK if any(DEVICE_PEAK in r.metrics for r in records) else HOST_PEAK


def common_memory_metric(record_lists: Sequence[Sequence[TrialRecord]]) -> str:
    """The peak-memory metric every study has: device allocated only if all studies have it."""
    metrics = {memory_metric(records) for records in record_lists}
    return DEVICE_PEAK if metrics == {DEVICE_PEAK} else HOST_PEAK


def pareto_mask(memory: Sequence[float], throughput: Sequence[float]) -> list[bool]:
    """Which points no other point dominates (no more memory, no less throughput, and strictly
    better in one)."""

    def dominated(i: int) -> bool:
        return any(
            memory[j] <= memory[i]
            and throughput[j] >= throughput[i]
            and (memory[j] < memory[i] or throughput[j] > throughput[i])
            for j in range(len(memory))
        )

    return [not dominated(i) for i in range(len(memory))]


def pareto_points(records: Sequence[TrialRecord], memory: str) -> pd.DataFrame:
    """One row per configuration (a trial and its confirmation runs) for the
    throughput-vs-memory plot.

    Columns: number (the original trial's), state, status, feasible (in every complete run),
    zero_stage, category, memory_bytes (mean of the `memory` metric), tokens_per_s (mean),
    memory_half_width and tokens_half_width (95% intervals, NaN for one run), runs (complete
    ones), predicted_bytes (predicted device peak, known before launch even for pruned
    trials), measured (both measured values present), pareto (on the front of the measured,
    COMPLETE, feasible configurations, by their means).
    """
    rows = []
    for group in configurations(records):
        r, complete = group.original, bool(group.complete)
        memory_found, tokens_found = group.metric(memory), group.metric(THROUGHPUT)
        rows.append({
            "number": group.number,
            "state": "COMPLETE" if complete else r.state,
            "status": Status.OK if complete else r.status,
            "feasible": group.feasible,
            "zero_stage": knob(r, "actor.zero_stage"),
            "category": category(r),
            "memory_bytes": memory_found.mean, "tokens_per_s": tokens_found.mean,
            "memory_half_width": memory_found.half_width,
            "tokens_half_width": tokens_found.half_width,
            "runs": len(group.complete),
            "predicted_bytes": r.predicted.get(PREDICTED_PEAK, math.nan),
        })  # fmt: skip
    columns = ["number", "state", "status", "feasible", "zero_stage", "category",
               "memory_bytes", "tokens_per_s", "memory_half_width", "tokens_half_width",
               "runs", "predicted_bytes", "measured", "pareto"]  # fmt: skip
    frame = pd.DataFrame(rows, columns=columns[:-2])
    frame["measured"] = (
        (frame["state"] == "COMPLETE")
        & frame["memory_bytes"].notna()
        & frame["tokens_per_s"].notna()
    )
    candidates = frame[frame["measured"] & frame["feasible"].astype(bool)]
    front = pareto_mask(list(candidates["memory_bytes"]), list(candidates["tokens_per_s"]))
    frame["pareto"] = False
    frame.loc[candidates.index[front], "pareto"] = True
    return frame[columns]


def importance_minimum() -> int:
    """The fewest configurations Optuna's PED-ANOVA evaluator works from: its docstring asks
    for "at least 5 trials above target_quantile", and it keeps the ceil(quantile x n) best
    (its _QuantileFilter), so with the default quantile 0.1 that is n = 41. The quantile is
    read from the installed evaluator's signature."""
    quantile = inspect.signature(PedAnovaImportanceEvaluator).parameters["target_quantile"]
    return next(n for n in itertools.count(1)
                if math.ceil(quantile.default * n) >= PED_ANOVA_TOP_TRIALS)  # fmt: skip


def importance_obstacle(
    records: Sequence[TrialRecord], objectives: Sequence[Objective], index: int
) -> str | None:
    """Why parameter importance cannot be computed for objective `index`, or None if it can.
    Counted over configurations (confirmation runs averaged into their original)."""
    complete = [c for c in configurations(records) if is_finite(c.objective(index).mean)]
    needed = importance_minimum()
    if len(complete) < needed:
        return (f"too few complete trials for importance: Optuna's PED-ANOVA needs at least "
                f"{needed} configurations ({PED_ANOVA_TOP_TRIALS} in its top 10%), this study "
                f"has {len(complete)}")  # fmt: skip
    params = [c.original.params for c in complete]
    names = {name for p in params for name in p}
    if not any(len({repr(p.get(n)) for p in params}) > 1 for n in names):
        return "no searched knob takes more than one value among the complete trials"
    return None


def configuration_study(study: optuna.Study, records: Sequence[TrialRecord]) -> optuna.Study:
    """An in-memory study holding one COMPLETE trial per configuration, its values the means
    over its runs, so repeated configurations weigh once in Optuna's importance."""
    frozen = {t.number: t for t in study.get_trials(deepcopy=False)}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
    try:
        means = optuna.create_study(directions=study.directions)
    finally:
        optuna.logging.set_verbosity(verbosity)
    for group in configurations(records):
        values = [group.objective(i).mean for i in range(len(study.directions))]
        if group.complete and all(map(is_finite, values)):
            original = frozen[group.number]
            means.add_trial(optuna.trial.create_trial(
                values=values, params=original.params, distributions=original.distributions,
            ))  # fmt: skip
    return means


def _lower_is_better(objective: Objective, index: int):
    """The target PED-ANOVA wants: it ranks a `target` lower-is-better, whatever the study's
    directions."""
    sign = -1.0 if objective.direction == "maximize" else 1.0
    return lambda trial: sign * trial.values[index]


class Importance(NamedTuple):
    objective: str
    importances: dict[str, float]  # knob -> share of importance, largest first
    note: str  # why `importances` is empty, else ""


def param_importances(study: optuna.Study, objectives: Sequence[Objective]) -> list[Importance]:
    """Per objective, Optuna's default importance evaluator (PED-ANOVA in Optuna 5) over the
    study's configurations (means of their runs), or a note saying why it cannot be
    computed."""
    records = [from_frozen_trial(t) for t in study.get_trials(deepcopy=False)]
    means = configuration_study(study, records)
    results = []
    for index, objective in enumerate(objectives):
        obstacle = importance_obstacle(records, objectives, index)
        if obstacle:
            results.append(Importance(objective.metric, {}, obstacle))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "computes the importances ... low target values"
            found = get_param_importances(means, target=_lower_is_better(objective, index))
        results.append(Importance(objective.metric, dict(found), ""))
    return results


def importance_table(importances: Sequence[Importance]) -> pd.DataFrame:
    """Long form: objective, param, importance."""
    rows = [
        {"objective": item.objective, "param": name, "importance": share}
        for item in importances
        for name, share in item.importances.items()
    ]
    return pd.DataFrame(rows, columns=["objective", "param", "importance"])


def top_trials(
    records: Sequence[TrialRecord], objectives: Sequence[Objective], count: int = 5
) -> list[int]:
    """Original trial numbers of the `count` best configurations by the first objective (their
    means), then the baseline (when it completed and is not among them) as the reference."""
    if not objectives:
        return []
    ranking = ranked_configurations(records, 0, objectives[0].direction)
    numbers = [group.number for group, _ in ranking[:count]]
    baseline = baseline_of(records)
    if baseline is not None and baseline.state == "COMPLETE" and baseline.number not in numbers:
        numbers.append(baseline.number)
    return numbers


def _chosen(records: Sequence[TrialRecord], numbers: Sequence[int]) -> list[TrialRecord]:
    by_number = {r.number: r for r in records}
    return [by_number[n] for n in numbers]


def stage_sources(records: Sequence[TrialRecord]) -> dict[str, dict[str, int]]:
    """Per stage (sft, rm), how many launched trials `trained` it, took it `given` (0 steps: a
    checkpoint used as is) or `reused` it from the study's stage cache (spec `measure`); and
    in how many PPO's start evaluation was `reused` from there (START)."""
    counts = {stage: {"trained": 0, "given": 0, "reused": 0} for stage in REUSABLE_STAGES}
    counts[START] = {"reused": 0}
    for r in records:
        if not r.metrics:  # never launched, or nothing recorded
            continue
        counts[START]["reused"] += r.metrics.get(START_REUSED) == 1
        for stage in REUSABLE_STAGES:
            count = counts[stage]
            if r.metrics.get(f"{stage}/reused") == 1:
                count["reused"] += 1
            elif r.config.get(stage, {}).get("steps") == 0:
                count["given"] += 1
            else:
                count["trained"] += 1
    return counts


def time_breakdown(records: Sequence[TrialRecord], numbers: Sequence[int]) -> pd.DataFrame:
    """Seconds per stage (columns TIMED_PHASES, NaN when missing) of the given trials, in order,
    with their baseline name."""
    rows = [
        {
            "number": r.number,
            "baseline": r.baseline,
            **{stage: r.metrics.get(f"time/{stage}_s", math.nan) for stage in TIMED_PHASES},
        }
        for r in _chosen(records, numbers)
    ]
    return pd.DataFrame(rows, columns=["number", "baseline", *TIMED_PHASES])


def series_steps(count: int, total: int) -> list[int]:
    """The PPO steps of a stored series of `count` points from a run of `total` steps: the
    orchestrator thins long series to evenly strided samples (values[int(i * stride)])."""
    if not 0 < count < total:
        return list(range(count))
    stride = total / count
    return [int(i * stride) for i in range(count)]


def ppo_curves(records: Sequence[TrialRecord], numbers: Sequence[int]) -> pd.DataFrame:
    """Long form per PPO step (0-based, warm-up included) of the CURVE_SERIES of the given
    configurations (original trial numbers): number, series, step, value (the mean over the
    configuration's complete runs), sd (NaN for one run), runs."""
    groups = {c.number: c for c in configurations(records)}
    rows = []
    for number in numbers:
        group = groups[number]
        runs = group.complete or list(group.runs[:1])
        for name in CURVE_SERIES:
            per_step: dict[int, list[float]] = {}
            for r in runs:
                values = r.series.get(name, [])
                steps = series_steps(len(values), int(r.metrics.get("ppo/steps", len(values))))
                for step, value in zip(steps, values, strict=True):
                    per_step.setdefault(step, []).append(value)
            for step, values in sorted(per_step.items()):
                found = estimate(values)
                rows.append({"number": number, "series": name, "step": step,
                             "value": found.mean, "sd": found.sd, "runs": found.n})  # fmt: skip
    return pd.DataFrame(rows, columns=["number", "series", "step", "value", "sd", "runs"])


def sample_answers(
    records: Sequence[TrialRecord], numbers: Sequence[int], per_trial: int = 3
) -> pd.DataFrame:
    """The first `per_trial` decoded answers each given trial recorded (its "samples":
    prompt, answer, gold reward, reward-model score), what a user reads before trusting a
    reward: number, prompt, answer, gold, score."""
    by_number = {r.number: r for r in records}
    rows = [
        {"number": number, **{key: sample.get(key) for key in SAMPLE_FIELDS}}
        for number in numbers
        for sample in by_number[number].samples[:per_trial]
    ]
    return pd.DataFrame(rows, columns=["number", *SAMPLE_FIELDS])


def stage_memory(records: Sequence[TrialRecord]) -> pd.DataFrame:
    """Predicted device peak vs the measured peak, per trial and stage.

    `measured` says what was measured: "device allocated" (torch.cuda, comparable) or
    "host RSS" (the CPU, which also counts the interpreter, libraries and data).
    """
    rows = []
    for r in records:
        for stage in MEMORY_STAGES:  # predicted and measured peaks
            predicted = r.metrics.get(f"mem/{stage}/predicted_device_peak_bytes")
            device = r.metrics.get(f"mem/{stage}/peak_device_allocated_bytes")
            host = r.metrics.get(f"mem/{stage}/peak_host_rss_bytes")
            measured, kind = (
                (device, "device allocated") if device is not None else (host, "host RSS")
            )
            if predicted is None or measured is None:
                continue
            rows.append({
                "number": r.number, "stage": stage, "predicted_bytes": predicted,
                "measured_bytes": measured, "measured": kind,
                "ratio": measured / predicted if predicted else math.nan,
            })  # fmt: skip
    columns = ["number", "stage", "predicted_bytes", "measured_bytes", "measured", "ratio"]
    return pd.DataFrame(rows, columns=columns)


def model_states_memory(records: Sequence[TrialRecord]) -> pd.DataFrame:
    """Predicted vs measured model states (parameters, gradients, optimizer states) per trial and
    engine: the same quantity on both sides, so the ratio tests the memory model itself."""
    rows = [
        {
            "number": r.number,
            "engine": engine,
            "predicted_bytes": predicted,
            "measured_bytes": measured,
            "ratio": measured / predicted if predicted else math.nan,
        }
        for r in records
        for engine in ENGINES
        if (predicted := r.metrics.get(f"mem/{engine}/predicted_model_states_bytes")) is not None
        and (measured := r.metrics.get(f"mem/{engine}/measured_model_states_bytes")) is not None
    ]
    columns = ["number", "engine", "predicted_bytes", "measured_bytes", "ratio"]
    return pd.DataFrame(rows, columns=columns)


def ratio_summary(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    """Measured / predicted per `by` (engine or stage): trials, median, min and max ratio."""
    grouped = frame.groupby(by, sort=False)["ratio"]
    summary = grouped.agg(trials="count", median="median", min="min", max="max")
    return summary.reset_index()


def failures(records: Sequence[TrialRecord]) -> pd.DataFrame:
    """FAIL and PRUNED trials grouped by (state, status, reason): count and trial numbers, the
    largest group first."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for r in sorted(records, key=lambda r: r.number):
        if r.state in ("FAIL", "PRUNED"):
            groups.setdefault((r.state, r.status, r.reason), []).append(r.number)
    rows = [
        {"state": state, "status": status, "reason": reason, "count": len(numbers),
         "trials": tuple(numbers)}
        for (state, status, reason), numbers in groups.items()
    ]  # fmt: skip
    frame = pd.DataFrame(rows, columns=["state", "status", "reason", "count", "trials"])
    return frame.sort_values(
        ["count", "state", "status"], ascending=[False, True, True], kind="stable"
    ).reset_index(drop=True)


def metric_names(records: Sequence[TrialRecord]) -> list[str]:
    """Every metric any trial has, sorted."""
    return sorted({name for r in records for name in r.metrics})


def trial_table(
    records: Sequence[TrialRecord], objectives: Sequence[Objective], metrics: Sequence[str]
) -> pd.DataFrame:
    """One row per trial: number, state, status, baseline, feasible, the params (dotted names),
    the objective values (by metric; Optuna's values, empty unless COMPLETE), the given other
    `metrics` (slashed names), wall_s and reason."""
    objective_names = [o.metric for o in objectives]
    others = [name for name in metrics if name not in objective_names]
    rows = []
    for r in sorted(records, key=lambda r: r.number):
        values = dict(zip(objective_names, r.values or (), strict=False))
        rows.append({
            "number": r.number, "state": r.state, "status": r.status, "baseline": r.baseline,
            "feasible": r.feasible, **r.params,
            **{name: values.get(name, math.nan) for name in objective_names},
            **{name: r.metrics.get(name, math.nan) for name in others},
            "wall_s": r.wall_s, "reason": r.reason,
        })  # fmt: skip
    params = list(dict.fromkeys(name for r in records for name in r.params))
    columns = ["number", "state", "status", "baseline", "feasible", *params, *objective_names]
    return pd.DataFrame(rows, columns=[*columns, *others, "wall_s", "reason"])
