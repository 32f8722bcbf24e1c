"""Figures drawn from the report tables of `tunelab.report.data` (matplotlib, no pyplot).

`matplotlib.figure.Figure` needs no backend switch and no display: `png` renders with Agg.
Each function takes the frame its data function returns and draws nothing else.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from tunelab.report.data import CURVE_SERIES, TIMED_PHASES, Importance
from tunelab.report.render import GIB, MIB

MARKERS = {"plain": "o", "offload": "s", "lora": "^", "lora+offload": "D"}
_PALETTE = tuple(f"C{i}" for i in range(10))
_DPI = 100


def png(figure: Figure) -> bytes:
    """The figure as PNG bytes (Agg)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")  # legends outside too
    return buffer.getvalue()


def _byte_scale(values: pd.Series) -> tuple[float, str]:
    """Divisor and unit that suit the largest of `values`."""
    return (GIB, "GiB") if np.nanmax(values) >= GIB else (MIB, "MiB")


def _trial_label(number: int, baseline) -> str:
    return f"#{number} (baseline {baseline})" if pd.notna(baseline) else f"#{number}"


def _colours(values: pd.Series) -> dict[str, str]:
    """A palette colour per distinct value as text: numbers (ZeRO stages) in order, anything
    else (study names) in order of first appearance."""
    keys = list(dict.fromkeys(values.astype(str)))
    if all(key.isdigit() for key in keys):
        keys.sort(key=int)
    return {key: _PALETTE[i % len(_PALETTE)] for i, key in enumerate(keys)}


def pareto_figure(
    points: pd.DataFrame, memory_metric: str, colour_by: str, colour_title: str
) -> Figure:
    """Throughput vs peak memory of the measured trials, colour = `colour_by`, marker =
    category, the Pareto front ringed and joined by a step line (one front per study when
    colouring by study); below, a strip of the failed and pruned trials at their predicted
    device peak.

    points: `data.pareto_points` (with a `study` column when comparing studies); it must hold
    at least one measured trial.
    """
    measured = points[points["measured"]]
    unmeasured = points[~points["measured"] & points["state"].isin(["FAIL", "PRUNED"])]
    figure = Figure(figsize=(8, 6), layout="constrained")
    top, strip = figure.subplots(2, 1, height_ratios=[4, 1])
    colours = _colours(points[colour_by])
    scale, unit = _byte_scale(measured["memory_bytes"])
    repeated = measured[measured["runs"] > 1]
    top.errorbar(
        repeated["memory_bytes"] / scale, repeated["tokens_per_s"],
        xerr=repeated["memory_half_width"].fillna(0) / scale,
        yerr=repeated["tokens_half_width"].fillna(0), fmt="none", ecolor="grey", elinewidth=1,
        capsize=3,
    )  # fmt: skip
    for (key, category), group in measured.groupby(
        [points[colour_by].astype(str), "category"], sort=False
    ):
        feasible = group["feasible"].astype(bool)
        for mask, face in ((feasible, colours[key]), (~feasible, "none")):
            top.scatter(
                group["memory_bytes"][mask] / scale, group["tokens_per_s"][mask],
                marker=MARKERS[category], facecolors=face, edgecolors=colours[key], s=45,
            )  # fmt: skip
    front = measured[measured["pareto"]].sort_values("memory_bytes")
    fronts = points["study"] if "study" in points else pd.Series("", index=points.index)
    for key, group in front.groupby(fronts, sort=False):
        top.step(
            group["memory_bytes"] / scale, group["tokens_per_s"], where="post",
            color=colours.get(key, "grey"), alpha=0.6,
        )  # fmt: skip
        top.scatter(
            group["memory_bytes"] / scale, group["tokens_per_s"], s=160, facecolors="none",
            edgecolors="black", linewidths=1.2,
        )  # fmt: skip
        for _, row in group.iterrows():
            top.annotate(
                f"#{row['number']}", (row["memory_bytes"] / scale, row["tokens_per_s"]),
                xytext=(6, 4), textcoords="offset points", fontsize=8,
            )  # fmt: skip
    top.set_xlabel(f"{memory_metric} ({unit})")
    top.set_ylabel("PPO end-to-end tokens/s")
    top.set_title("Throughput vs peak memory (ringed: Pareto-optimal; hollow: infeasible; "
                  "bars: 95% intervals of repeats)", fontsize=10)  # fmt: skip
    top.grid(alpha=0.3)
    colour_legend = top.legend(
        handles=[Line2D([], [], color=c, marker="o", ls="") for c in colours.values()],
        labels=list(colours), title=colour_title, fontsize=8,
        loc="upper left", bbox_to_anchor=(1.01, 1.0),  # outside: never over a point
    )  # fmt: skip
    top.add_artist(colour_legend)
    categories = list(dict.fromkeys(points["category"]))
    top.legend(
        handles=[Line2D([], [], color="grey", marker=MARKERS[c], ls="") for c in categories],
        labels=categories, fontsize=8, loc="lower left", bbox_to_anchor=(1.01, 0.0),
    )  # fmt: skip
    _unmeasured_strip(strip, unmeasured, colour_by, colours)
    return figure


def _unmeasured_strip(axes, unmeasured: pd.DataFrame, colour_by: str, colours) -> None:
    """Failed and pruned trials on their own axis: they have no measured memory or
    throughput, only (sometimes) the predicted device peak."""
    axes.set_title("Failed and pruned trials: predicted device peak (not measured)", fontsize=9)
    axes.set_yticks([])
    known = unmeasured[unmeasured["predicted_bytes"].notna()]
    if known.empty:
        axes.set_xticks([])  # nothing to place on a memory axis
    if not known.empty:
        scale, unit = _byte_scale(known["predicted_bytes"])
        statuses = list(dict.fromkeys(known["status"]))
        for _, row in known.iterrows():
            axes.scatter(
                row["predicted_bytes"] / scale, statuses.index(row["status"]),
                marker="x" if row["state"] == "FAIL" else "v",
                color=colours[str(row[colour_by])],
            )  # fmt: skip
        axes.set_yticks(range(len(statuses)), statuses, fontsize=8)
        axes.set_ylim(-0.7, len(statuses) - 0.3)
        axes.set_xlabel(f"predicted device peak ({unit})")
    rest = unmeasured[unmeasured["predicted_bytes"].isna()]
    listed = [f"#{n} ({s})" for n, s in zip(rest["number"], rest["status"], strict=True)]
    if len(listed) > 12:
        listed = [*listed[:12], f"and {len(listed) - 12} more"]
    text = "without a prediction: " + ", ".join(listed) if listed else ""
    if unmeasured.empty:
        text = "no failed or pruned trial"
    axes.text(0.01, 0.9, text, transform=axes.transAxes, fontsize=8, va="top")


def importance_figure(importances: Sequence[Importance]) -> Figure:
    """One horizontal bar chart of knob importances per objective that has them."""
    shown = [item for item in importances if item.importances]
    knobs = max(len(item.importances) for item in shown)
    figure = Figure(figsize=(min(4.2 * len(shown), 12), 1.2 + 0.35 * knobs), layout="constrained")
    for axes, item in zip(np.atleast_1d(figure.subplots(1, len(shown))), shown, strict=True):
        names = list(item.importances)[::-1]  # largest on top
        axes.barh(names, [item.importances[n] for n in names], color="C0")
        axes.set_title(item.objective, fontsize=9)
        axes.set_xlabel("importance (PED-ANOVA, sums to 1)")
        axes.set_xlim(0, 1)
        axes.tick_params(axis="y", labelsize=8)
    return figure


def time_figure(breakdown: pd.DataFrame) -> Figure:
    """Stacked horizontal bars of seconds per stage, first trial on top.

    breakdown: `data.time_breakdown` (missing stages drawn as 0)."""
    labels = [
        _trial_label(n, b) for n, b in zip(breakdown["number"], breakdown["baseline"], strict=True)
    ]
    figure = Figure(figsize=(8, 1.4 + 0.45 * len(labels)), layout="constrained")
    axes = figure.subplots()
    left = np.zeros(len(labels))
    for i, stage in enumerate(TIMED_PHASES):
        seconds = breakdown[stage].fillna(0).to_numpy(dtype=float)
        axes.barh(labels, seconds, left=left, label=stage, color=_PALETTE[i])
        left += seconds
    axes.invert_yaxis()
    axes.set_xlabel("seconds")
    axes.set_title("Time per stage")
    axes.legend(
        fontsize=8, ncols=len(TIMED_PHASES), loc="lower center", bbox_to_anchor=(0.5, 1.08)
    )
    axes.grid(axis="x", alpha=0.3)
    return figure


def curves_figure(curves: pd.DataFrame) -> Figure:
    """One panel per PPO series present (score, gold, KL): a line per configuration over PPO
    steps, a band of ± one sd across its runs where it was repeated.

    curves: `data.ppo_curves`, not empty."""
    present = [name for name in CURVE_SERIES if (curves["series"] == name).any()]
    figure = Figure(figsize=(4.5 * len(present), 3.6), layout="constrained")
    for axes, name in zip(np.atleast_1d(figure.subplots(1, len(present))), present, strict=True):
        for number, group in curves[curves["series"] == name].groupby("number", sort=False):
            runs = int(group["runs"].max())
            label = f"#{number}" + (f" (mean of {runs})" if runs > 1 else "")
            (line,) = axes.plot(group["step"], group["value"], label=label)
            if runs > 1:
                axes.fill_between(group["step"], group["value"] - group["sd"],
                                  group["value"] + group["sd"], color=line.get_color(),
                                  alpha=0.2, linewidth=0)  # fmt: skip
        axes.set_title(name)
        axes.set_xlabel("PPO step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return figure


def optuna_figure(plot, *args, **kwargs) -> Figure:
    """A figure drawn by one of optuna.visualization.matplotlib's functions (they draw on
    pyplot figures; the figure is closed in pyplot and returned for `png`)."""
    import matplotlib.pyplot as pyplot
    from optuna.exceptions import ExperimentalWarning

    # They set pyplot's ggplot style globally: the context restores tunelab's afterwards.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", ExperimentalWarning)  # Optuna marks them experimental
        axes = plot(*args, **kwargs)
    figure = np.atleast_1d(axes).flat[0].figure
    pyplot.close(figure)
    return figure


def _predicted_vs_measured(axes, frame: pd.DataFrame, colour_by: str, title: str, ylabel: str):
    """Scatter of measured against predicted bytes (log-log) with the y = x line."""
    both = pd.concat([frame["predicted_bytes"], frame["measured_bytes"]])
    scale, unit = _byte_scale(both)
    for key, group in frame.groupby(colour_by, sort=False):
        axes.scatter(
            group["predicted_bytes"] / scale, group["measured_bytes"] / scale, label=key, s=25
        )
    ends = [both.min() / scale / 1.5, both.max() / scale * 1.5]
    axes.plot(ends, ends, color="black", ls="--", lw=1, label="y = x")
    axes.set_xscale("log")
    axes.set_yscale("log")
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(NullFormatter())
    axes.set_xlabel(f"predicted ({unit})")
    axes.set_ylabel(f"{ylabel} ({unit})")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=7)


def memory_figure(states: pd.DataFrame, stages: pd.DataFrame) -> Figure:
    """Predicted vs measured memory: model states per engine (left), stage peaks (right); a
    panel per non-empty frame (`data.model_states_memory`, `data.stage_memory`)."""
    panels = [
        (states, "engine", "Model states per engine", "measured"),
        (
            stages,
            "stage",
            "Stage peak",
            "measured " + " / ".join(dict.fromkeys(stages["measured"])),
        ),
    ]
    panels = [panel for panel in panels if not panel[0].empty]
    figure = Figure(figsize=(4.6 * len(panels), 4.2), layout="constrained")
    for axes, panel in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels, strict=True):
        _predicted_vs_measured(axes, *panel)
    return figure
