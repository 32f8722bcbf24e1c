"""A study's report (and a comparison of studies): tables -> figures -> sections -> files.

write_report(study, reports/<study>) -> index.html, report.md, *.png and trials.csv there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from tunelab.records import TrialRecord, from_frozen_trial
from tunelab.repeats import Verdict
from tunelab.report import compare, data, plots
from tunelab.report.render import (
    HALF_WIDTH,
    Image,
    Section,
    Table,
    display,
    format_metric,
    to_html,
    to_markdown,
)
from tunelab.spec import Objective
from tunelab.stagecache import START

if TYPE_CHECKING:
    import optuna

TOP_TRIALS = 5  # how many of the best trials the time and reward sections show
STAGE_NAMES = {"sft": "SFT", "rm": "RM", START: "PPO's start evaluation"}  # the overview's


def _records(study: optuna.Study) -> list[TrialRecord]:
    return [from_frozen_trial(t) for t in study.get_trials(deepcopy=False)]


def _objectives(study: optuna.Study) -> list[Objective]:
    return data.objectives_from(study.user_attrs, [d.name.lower() for d in study.directions])


def _image(name: str, figure) -> Image:
    return Image(name, plots.png(figure))


def gain_text(row: pd.Series) -> str:
    """How a headline row's best value compares with the baseline's: "within noise of the
    baseline" when both were repeated and their 95% intervals overlap (never a multiple);
    else "1.84x the baseline", "38% less than the baseline", "+0.12 vs the baseline" (when a
    ratio means nothing); "" without a best or a baseline value. `noise_note` qualifies it."""
    if pd.isna(row["trial"]) or math.isnan(row["baseline_value"]):
        return ""
    if row["verdict"] == Verdict.WITHIN:
        return "within noise of the baseline"
    if math.isnan(row["ratio"]):
        text = f"{row['difference']:+.4g} vs the baseline"
    elif row["direction"] == "maximize":
        text = f"{row['ratio']:.2f}x the baseline"
    elif row["change"] == 0:
        text = "the same as the baseline"
    else:
        more = "less" if row["change"] < 0 else "more"
        text = f"{abs(row['change']):.0%} {more} than the baseline"
    return text


def noise_note(row: pd.Series) -> str:
    """What the gain is worth: "outside noise" (disjoint 95% intervals), or "single runs:
    noise not measured"; "" when within noise (gain_text says so) or there is no gain."""
    if not gain_text(row) or row["verdict"] == Verdict.WITHIN:
        return ""
    return {Verdict.OUTSIDE: "outside noise",
            Verdict.UNKNOWN: "single runs, noise not measured"}[row["verdict"]]  # fmt: skip


def measured_text(metric: str, mean: float, half_width: float, runs: int) -> str:
    """A mean with its 95% interval and run count, or the one run's value."""
    if runs >= 2:
        return (f"{format_metric(metric, mean)} ± {format_metric(metric, half_width)} "
                f"(mean of {runs} runs, 95% interval)")  # fmt: skip
    return format_metric(metric, mean)


def headline_sentence(row: pd.Series) -> str:
    """One row of `data.headline` in plain words and numbers."""
    metric = row["objective"]
    if pd.isna(row["trial"]):
        return f"No complete, feasible trial for {metric} yet."
    knobs = row["params"] or "no searched knobs"
    value = measured_text(metric, row["value"], row["half_width"], row["runs"])
    best = f"Best {metric}: {value} (trial #{row['trial']}: {knobs})"
    if pd.isna(row["baseline"]):
        return f"{best}; this study has no baseline trial."
    if row["trial"] == row["baseline_trial"]:
        return f"{best}: the baseline '{row['baseline']}' itself."
    if math.isnan(row["baseline_value"]):
        return (
            f"{best}; the baseline '{row['baseline']}' (trial #{row['baseline_trial']}) has no "
            f"value (status {row['baseline_status']})."
        )
    baseline_value = measured_text(metric, row["baseline_value"], row["baseline_half_width"],
                                   row["baseline_runs"])  # fmt: skip
    note = f"; {noise_note(row)}" if noise_note(row) else ""
    return f"{best}, {gain_text(row)} '{row['baseline']}' ({baseline_value}){note}."


def _headline_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The headline (with its `study` column, if any) with each value in its objective's
    unit."""
    rows = [
        {
            **({"study": row["study"]} if "study" in row else {}),
            "objective": row["objective"], "best trial": row["trial"],
            "value": format_metric(row["objective"], row["value"]),
            "± 95%": format_metric(row["objective"], row["half_width"]), "runs": row["runs"],
            "knobs": row["params"], "baseline": row["baseline"],
            "baseline value": format_metric(row["objective"], row["baseline_value"]),
            "baseline ± 95%": format_metric(row["objective"], row["baseline_half_width"]),
            "baseline runs": row["baseline_runs"], "gain": gain_text(row),
            "noise": row["verdict"] if gain_text(row) else "",
        }
        for _, row in frame.iterrows()
    ]  # fmt: skip
    return display(pd.DataFrame(rows))


def headline_section(records: Sequence[TrialRecord], objectives: Sequence[Objective]) -> Section:
    frame = data.headline(records, objectives)
    if frame.empty:
        return Section("Headline", ["This study has no objectives."])
    return Section(
        "Headline",
        [headline_sentence(row) for _, row in frame.iterrows()],
        tables=[Table("", _headline_table(frame))],
    )


def _memory_note(memory_metric: str) -> str:
    if memory_metric == data.DEVICE_PEAK:
        return f"Memory is {memory_metric}: torch.cuda's peak allocated bytes on the device."
    return (
        f"Memory is {memory_metric}, the host's peak resident memory (device memory was not "
        "recorded throughout), which includes the process baseline (interpreter, libraries, "
        "data)."
    )


def pareto_section(records: Sequence[TrialRecord]) -> Section:
    metric = data.memory_metric(records)
    points = data.pareto_points(records, metric)
    if not points["measured"].any():
        return Section("Throughput vs memory", ["No complete trial measured both yet."])
    front = points[points["pareto"]].sort_values("memory_bytes")
    knobs = {r.number: data.format_params(r.params) for r in records}
    table = front[["number", "zero_stage", "category", "runs", "memory_bytes",
                   "memory_half_width", "tokens_per_s", "tokens_half_width"]]  # fmt: skip
    table = table.rename(columns={
        "memory_bytes": metric, "memory_half_width": metric + HALF_WIDTH,
        "tokens_per_s": data.THROUGHPUT, "tokens_half_width": data.THROUGHPUT + HALF_WIDTH,
    })  # fmt: skip
    return Section(
        "Throughput vs memory",
        [
            f"y = {data.THROUGHPUT}; colour = the actor's ZeRO stage; marker = offload / LoRA. "
            "Ringed points are Pareto-optimal among the complete, feasible configurations (by "
            "the means of their runs; bars: 95% intervals where repeated): no other has "
            "both more throughput and less memory. Failed and pruned trials have no "
            "measurement; the strip below places them at their predicted device peak.",
            _memory_note(metric),
        ],
        _image("pareto.png", plots.pareto_figure(points, metric, "zero_stage", "ZeRO stage")),
        [Table("Pareto front:", display(table.assign(knobs=table["number"].map(knobs))))],
    )


def importance_section(study: optuna.Study, objectives: Sequence[Objective]) -> Section:
    importances = data.param_importances(study, objectives)
    notes = [f"{item.objective}: {item.note}." for item in importances if item.note]
    computed = [item for item in importances if item.importances]
    if not computed:
        return Section("Parameter importance", notes or ["This study has no objectives."])
    return Section(
        "Parameter importance",
        [
            "How much each searched knob decides whether a trial lands among the best for an "
            "objective (Optuna's PED-ANOVA over the complete trials).",
            *notes,
        ],
        _image("importance.png", plots.importance_figure(computed)),
        [Table("", display(data.importance_table(computed)))],
    )


def time_section(records: Sequence[TrialRecord], numbers: Sequence[int]) -> Section:
    breakdown = data.time_breakdown(records, numbers)
    if breakdown.empty or breakdown[list(data.TIMED_PHASES)].isna().all().all():
        return Section("Time per stage", ["No complete trial to break down yet."])
    table = breakdown.assign(total_s=breakdown[list(data.TIMED_PHASES)].sum(axis=1))
    table = table.rename(columns={stage: f"{stage}_s" for stage in data.TIMED_PHASES})
    return Section(
        "Time per stage",
        ["The best trials by the first objective (and the baseline), seconds per stage."],
        _image("time.png", plots.time_figure(breakdown)),
        [Table("", display(table))],
    )


def curves_section(records: Sequence[TrialRecord], numbers: Sequence[int]) -> Section:
    curves = data.ppo_curves(records, numbers)
    if curves.empty:
        return Section("Reward and KL over PPO steps", ["No trial recorded PPO series."])
    return Section(
        "Reward and KL over PPO steps",
        [
            "ppo/score is the reward model's score, what PPO maximizes; ppo/gold is the gold "
            "reward of the synthetic task (absent for other data); ppo/kl is the policy's KL "
            "to the reference model. A score that rises while the gold reward stays flat means "
            "the policy games the reward model; a KL that grows without a gold gain means it "
            "drifts for nothing. Repeated configurations show their mean, the band ± one sd."
        ],
        _image("rewards.png", plots.curves_figure(curves)),
    )


def samples_section(records: Sequence[TrialRecord], numbers: Sequence[int]) -> Section | None:
    """Decoded answers of the top trials, when the trials recorded them (else no section)."""
    frame = data.sample_answers(records, numbers)
    if frame.empty:
        return None
    return Section(
        "Sample answers",
        ["A few held-out prompts with each top trial's decoded answer, its gold reward and "
         "the reward model's score: read them before trusting a reward."],
        tables=[Table("", display(frame))],
    )


def optuna_section(study: optuna.Study, objectives: Sequence[Objective]) -> Section | None:
    """Optuna's own optimisation history and parallel coordinates per objective
    (optuna.visualization.matplotlib); none without a complete trial."""
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    searched = any(t.params for t in complete)  # parallel coordinates need knobs
    images = []
    for index, objective in enumerate(objectives):
        target = {"target": lambda t, i=index: t.values[i], "target_name": objective.metric}
        slug = objective.metric.replace("/", "_")
        images.append(_image(f"history_{slug}.png", plots.optuna_figure(
            optuna_plots.plot_optimization_history, study, **target)))  # fmt: skip
        if searched:
            images.append(_image(f"parallel_{slug}.png", plots.optuna_figure(
                optuna_plots.plot_parallel_coordinate, study, **target)))  # fmt: skip
    return Section(
        "Optuna's views",
        ["Optuna's optimisation history (each trial's value in the order run) and parallel "
         "coordinates (each trial's knobs joined, coloured by the value) "
         "per objective, as optuna.visualization.matplotlib draws them; confirmation runs "
         "appear as trials of their own."],
        images=images,
    )


def memory_section(records: Sequence[TrialRecord]) -> Section:
    states = data.model_states_memory(records)
    stages = data.stage_memory(records)
    # A predicted device peak against the host's RSS compares nothing: on the CPU only the
    # model states (the same quantity on both sides) are shown.
    stages = stages[stages["measured"] != "host RSS"]
    if states.empty and stages.empty:
        return Section("Predicted vs measured memory", ["No trial recorded memory yet."])
    paragraphs = [
        "Model states (parameters, gradients, optimizer states) are predicted by tunelab's "
        "memory model and measured on the live engines: the same quantity on both sides, so "
        "their ratio tests the model."
    ]
    if stages.empty:
        paragraphs.append(
            "Stage peaks are compared on a GPU only (torch.cuda's allocated bytes); these "
            "trials ran on the CPU, whose host RSS also counts the interpreter, libraries and "
            "data."
        )
    tables = [
        Table(f"Measured / predicted {name} per {by}:", display(data.ratio_summary(frame, by)))
        for frame, by, name in ((states, "engine", "model states"), (stages, "stage", "peak"))
        if not frame.empty
    ]
    return Section(
        "Predicted vs measured memory",
        paragraphs,
        _image("memory.png", plots.memory_figure(states, stages)),
        tables,
    )


def failures_section(records: Sequence[TrialRecord]) -> Section:
    frame = data.failures(records)
    if frame.empty:
        return Section("Failures", ["No failed or pruned trial."])
    return Section("Failures", [], tables=[Table("", display(frame))])


def _shown_metrics(records: Sequence[TrialRecord]) -> list[str]:
    present = set(data.metric_names(records))
    return [name for name in data.KEY_METRICS if name in present]


def trials_section(records: Sequence[TrialRecord], objectives: Sequence[Objective]) -> Section:
    table = data.trial_table(records, objectives, _shown_metrics(records))
    if table.empty:
        return Section("All trials", ["No trials yet."])
    return Section(
        "All trials",
        ["Every trial; trials.csv holds all metrics."],
        tables=[Table("", display(table))],
    )


def _overview(records: Sequence[TrialRecord], objectives: Sequence[Objective]) -> str:
    counts = pd.Series([r.state for r in records], dtype=object).value_counts()
    states = ", ".join(f"{count} {state.lower()}" for state, count in counts.items())
    goals = ", ".join(f"{o.metric} ({o.direction})" for o in objectives)
    trials = "1 trial" if len(records) == 1 else f"{len(records)} trials"
    sources = []
    for stage, counts in data.stage_sources(records).items():
        told = [f"{how} in {n}" for how, n in counts.items() if n]
        if told and told != [f"trained in {sum(counts.values())}"]:  # say it when not plain
            sources.append(f"{STAGE_NAMES[stage]} {', '.join(told)}")
    stages = f" Stages: {'; '.join(sources)} (launched trials)." if sources else ""
    return f"{trials} ({states or 'none yet'}); objectives: {goals or 'none'}.{stages}"


def _write(out_dir: Path, title: str, sections: Sequence[Section], trials: pd.DataFrame) -> Path:
    """index.html, report.md, the PNGs and `trials` as trials.csv into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for section in sections:
        for image in section.all_images:
            (out_dir / image.name).write_bytes(image.png)
    (out_dir / "report.md").write_text(to_markdown(title, sections), encoding="utf-8")
    trials.to_csv(out_dir / "trials.csv", index=False)
    index = out_dir / "index.html"
    index.write_text(to_html(title, sections), encoding="utf-8")
    return index


def write_report(study: optuna.Study, out_dir: Path) -> Path:
    """Write the report of an Optuna study made by tunelab into `out_dir`; returns index.html.

    out_dir gets index.html (self-contained), report.md with the PNG plots next to it, and
    trials.csv (every trial, every metric).
    """
    records = _records(study)
    objectives = _objectives(study)
    top = data.top_trials(records, objectives, TOP_TRIALS)
    sections = [
        Section("Overview", [_overview(records, objectives)]),
        headline_section(records, objectives),
        pareto_section(records),
        importance_section(study, objectives),
        time_section(records, top),
        curves_section(records, top),
        samples_section(records, top),
        memory_section(records),
        optuna_section(study, objectives),
        failures_section(records),
        trials_section(records, objectives),
    ]
    sections = [section for section in sections if section is not None]
    trials = data.trial_table(records, objectives, data.metric_names(records))
    return _write(Path(out_dir), f"tunelab report: {study.study_name}", sections, trials)


def comparison_sections(studies: Sequence[compare.StudyData]) -> list[Section]:
    """Summary, best configuration per study, and the overlaid Pareto plot."""
    shared = compare.shared_objectives(studies)
    compared = ", ".join(o.metric for o in shared)
    note = f"Shared objectives: {compared}." if shared else "These studies share no objective."
    summary = Section(
        "Summary",
        [note],
        tables=[Table("", display(compare.study_summary(studies, shared)))],
    )
    best = compare.best_configs(studies, shared)
    best_section = Section(
        "Best configuration per study",
        [f"{row['study']}: {headline_sentence(row)}" for _, row in best.iterrows()],
        tables=[Table("", _headline_table(best))],
    )
    metric = data.common_memory_metric([s.records for s in studies])
    points = compare.comparison_points(studies, metric)
    if not points["measured"].any():
        pareto = Section("Throughput vs memory", ["No complete trial measured both yet."])
    else:
        figure = plots.pareto_figure(points, metric, "study", "study")
        pareto = Section(
            "Throughput vs memory",
            [
                "Colour = study; marker = offload / LoRA; ringed points and step lines are each "
                "study's own Pareto front.",
                _memory_note(metric),
            ],
            _image("pareto.png", figure),
        )
    return [summary, best_section, pareto]


def write_comparison(
    studies: Sequence[optuna.Study], out_dir: Path, labels: Sequence[str] | None = None
) -> Path:
    """Write one report setting several Optuna studies side by side; returns index.html.

    Same outputs as `write_report`; trials.csv has a `study` column holding `labels` (default:
    the study names, numbered where repeated).
    """
    if not studies:
        raise ValueError("write_comparison needs at least one study")
    names = compare.unique_names(labels or [s.study_name for s in studies])
    compared = [
        compare.StudyData(name, _records(s), _objectives(s))
        for name, s in zip(names, studies, strict=True)
    ]
    title = "tunelab comparison: " + " vs ".join(names)
    trials = compare.comparison_trials(compared)
    return _write(Path(out_dir), title, comparison_sections(compared), trials)
