"""Comparison tables: several studies side by side (pure functions of their records)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import pandas as pd

from tunelab.records import Status, TrialRecord
from tunelab.report.data import headline, metric_names, pareto_points, trial_table
from tunelab.spec import Objective


class StudyData(NamedTuple):
    name: str  # unique among the compared studies
    records: list[TrialRecord]
    objectives: list[Objective]


def unique_names(names: Sequence[str]) -> list[str]:
    """Study names with " (2)", " (3)" added to repeats (two storages may hold the same name)."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return unique


def study_labels(names: Sequence[str], folders: Sequence[str | None]) -> list[str]:
    """How a comparison names its studies: by their names when those differ; a study whose
    name another shares, by its run folder's name (`folders`: None for a study given by
    storage URL). Labels still alike get " (2)", " (3)" (unique_names)."""
    shared = {name for name in names if names.count(name) > 1}
    return unique_names([folder if name in shared and folder else name
                         for name, folder in zip(names, folders, strict=True)])  # fmt: skip


def shared_objectives(studies: Sequence[StudyData]) -> list[Objective]:
    """The objectives (metric and direction) every study has, in the first study's order."""
    if not studies:
        return []
    return [o for o in studies[0].objectives if all(o in s.objectives for s in studies[1:])]


def best_configs(studies: Sequence[StudyData], shared: Sequence[Objective]) -> pd.DataFrame:
    """`data.headline` of each study with a `study` column first, restricted to the `shared`
    objectives (each study's own objectives when none is shared)."""
    frames = []
    for study in studies:
        frame = headline(study.records, study.objectives)
        if shared:
            frame = frame[frame["objective"].isin([o.metric for o in shared])]
        frames.append(frame.assign(study=study.name))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["study"])
    return frame[["study", *(c for c in frame.columns if c != "study")]]


def study_summary(studies: Sequence[StudyData], shared: Sequence[Objective]) -> pd.DataFrame:
    """Per study: trials, ok / failed / pruned counts and the best value of each shared
    objective (one column per metric)."""
    best = best_configs(studies, shared)
    rows = []
    for study in studies:
        states = [r.state for r in study.records]
        mine = best[best["study"] == study.name].set_index("objective")["value"]
        rows.append({
            "study": study.name, "trials": len(study.records),
            "ok": sum(r.status == Status.OK for r in study.records),
            "failed": states.count("FAIL"), "pruned": states.count("PRUNED"),
            **{o.metric: mine.get(o.metric) for o in shared},
        })  # fmt: skip
    columns = ["study", "trials", "ok", "failed", "pruned", *(o.metric for o in shared)]
    return pd.DataFrame(rows, columns=columns)


def comparison_points(studies: Sequence[StudyData], memory: str) -> pd.DataFrame:
    """`data.pareto_points` of every study (each with its own front) and a `study` column."""
    frames = [pareto_points(s.records, memory).assign(study=s.name) for s in studies]
    return pd.concat(frames, ignore_index=True)


def comparison_trials(studies: Sequence[StudyData]) -> pd.DataFrame:
    """Every trial of every study with all its metrics, a `study` column first."""
    frames = [
        trial_table(s.records, s.objectives, metric_names(s.records)).assign(study=s.name)
        for s in studies
    ]
    frame = pd.concat(frames, ignore_index=True)
    return frame[["study", *(c for c in frame.columns if c != "study")]]
