"""`tunelab export`: a study's chosen trial as files a person launches as they are.

    EXPORT_DIR/ds_config_<engine>.json   one DeepSpeed config per engine, validated by
                                         DeepSpeed's own parser before it is written
    EXPORT_DIR/trial.yaml                the full trial configuration
    EXPORT_DIR/study.json                where it came from and what the study measured (means,
                                         sd and 95% intervals over the configuration's runs)
    EXPORT_DIR/README.md                 the commands: `tunelab trial` and DeepSpeed-Chat step 3

Building the files is pure (configs come from tunelab.dsconfig, the same functions the trial
used); only `write_export` touches the disk, and only `validate_ds_config` imports DeepSpeed.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shlex
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tunelab import dsconfig
from tunelab._typed import read_mapping
from tunelab.config import TrialConfig, config_from_dict
from tunelab.dschat import step3_command
from tunelab.errors import InputError
from tunelab.records import ENGINES, OBJECTIVES_ATTR, from_frozen_trial, is_finite
from tunelab.repeats import (
    Configuration,
    Estimate,
    Verdict,
    configurations,
    estimate,
    ranked_configurations,
    repeat_seed,
    verdict,
)


def choose_trial(study, objective: str | None = None, number: int | None = None) -> Configuration:
    """The configuration of trial `number` (it and its confirmation runs), or the best one for
    `objective` (default: the first) by its mean, as the report's headline chooses it."""
    records = [from_frozen_trial(t) for t in study.get_trials(deepcopy=False)]
    if number is not None:
        match = [c for c in configurations(records) if number in (r.number for r in c.runs)]
        if not match:
            raise InputError(f"study {study.study_name}: no trial {number}")
        run = next(r for r in match[0].runs if r.number == number)
        if run.state != "COMPLETE":
            raise InputError(f"trial {number} is {run.status}, not a finished ok trial")
        return match[0]
    objectives = study.user_attrs.get(OBJECTIVES_ATTR, [])
    metrics = [o["metric"] for o in objectives]
    if objective is None:
        index = 0
    elif objective in metrics:
        index = metrics.index(objective)
    else:
        raise InputError(
            f"--objective {objective}: the study's objectives are {', '.join(metrics)}"
        )
    best = ranked_configurations(records, index, objectives[index]["direction"])
    if not best:
        raise InputError(f"study {study.study_name}: no complete feasible trial to export")
    return best[0][0]


def measured_line(objectives: list[dict], chosen: Configuration) -> str:
    """What the study measured for the chosen configuration, per objective: mean ± 95%
    half-width over its runs, or the one run's value."""
    parts = []
    for index, objective in enumerate(objectives):
        found = chosen.objective(index)
        if found.repeated:
            parts.append(f"{objective['metric']} = {found.mean:.6g} ± {found.half_width:.3g} "
                         f"(mean ± 95% interval of {found.n} runs)")  # fmt: skip
        else:
            parts.append(f"{objective['metric']} = {found.mean:.6g} (one run)")
    return "; ".join(parts)


def _no_accelerator_warning(record: logging.LogRecord) -> bool:
    """Drop DeepSpeed's import-time "Setting accelerator to CPU ... unable to detect it": an
    export only parses configs, which needs no accelerator, and is made on machines without
    one."""
    return not record.getMessage().startswith("Setting accelerator to CPU")


def validate_ds_config(ds_config: dict, ranks: int, where: str) -> None:
    """DeepSpeed's own parser accepts the config (raises InputError naming the file if not).

    DeepSpeed reads the world size from a live process group, which an export has not; the
    batch keys are checked against `ranks` here and parsed for one rank."""
    logging.getLogger("DeepSpeed").addFilter(_no_accelerator_warning)  # before DeepSpeed loads
    from deepspeed.runtime.config import DeepSpeedConfig

    batch = ds_config["train_micro_batch_size_per_gpu"] * ds_config["gradient_accumulation_steps"]
    if ds_config["train_batch_size"] != batch * ranks:
        raise InputError(f"{where}: train_batch_size != micro x accumulation x {ranks} ranks")
    single_rank = copy.deepcopy(ds_config)
    single_rank["train_batch_size"] = batch
    try:
        DeepSpeedConfig(single_rank)
    except Exception as exc:  # DeepSpeed raises assertion and value errors alike
        raise InputError(f"{where}: DeepSpeed rejects it ({exc})") from None


def export_files(study_name: str, chosen: Configuration, objectives: list[dict]) -> dict[str, str]:
    """File name -> text of an export (pure): the configuration's original trial, with the
    study's figures as means over its runs (the report's headline figures)."""
    record = chosen.original
    estimates = [chosen.objective(index) for index in range(len(objectives))]
    config = config_from_dict(record.config, f"trial {record.number}:")
    files = {
        f"ds_config_{role}.json": json.dumps(ds, indent=2) + "\n"
        for role, ds in dsconfig.engine_ds_configs(config).items()
    }
    files["trial.yaml"] = (
        f"# tunelab trial trial.yaml --out runs/{study_name}-trial{record.number}\n"
        + yaml.safe_dump(config.to_dict(), sort_keys=False)
    )
    files["study.json"] = json.dumps(
        {"study": study_name, "trial": record.number, "params": record.params,
         "objectives": objectives, "values": [e.mean for e in estimates],
         "runs": [e.n for e in estimates], "sd": [_json_number(e.sd) for e in estimates],
         "ci95_half_width": [_json_number(e.half_width) for e in estimates],
         "trials": [r.number for r in chosen.complete], "metrics": record.metrics},
        indent=2,
    ) + "\n"  # fmt: skip
    argv, notes = step3_command(config)
    start = argv.index("main.py") + 1
    groups = [argv[:start]]  # the launcher, then one flag (and its value) per line
    for item in argv[start:]:
        if item.startswith("--"):
            groups.append([item])
        else:
            groups[-1].append(item)
    launch = " \\\n    ".join(shlex.join(group) for group in groups)
    lines = [
        f"# Trial {record.number} of study {study_name}",
        "",
        "Measured in the study: " + measured_line(objectives, chosen),
        "",
        stages_line(config),
        "",
        "## Reproduce with tunelab",
        "",
        "```bash",
        f"tunelab trial trial.yaml --out runs/{study_name}-trial{record.number}",
        "tunelab reproduce . --repeats 3   # mean and spread next to the study's figures",
        "```",
        "",
        "## DeepSpeed configs",
        "",
        "One per engine, each accepted by DeepSpeed's config parser: "
        + ", ".join(f"`ds_config_{role}.json`" for role in ENGINES)
        + ". Pass them to `deepspeed.initialize(config=...)` for the supervised stages (sft, rm),"
        " the PPO actor and critic (trained) and the reference and reward models (inference).",
        "",
        "## DeepSpeed-Chat step 3",
        "",
        "```bash",
        "cd DeepSpeed-Chat/training/step3_rlhf_finetuning",
        launch,
        "```",
        "",
        *[f"- {note}" for note in notes],
        "",
    ]
    files["README.md"] = "\n".join(lines)
    return files


def _json_number(value: float) -> float | None:
    """NaN (one run: no spread) as JSON's null."""
    return None if math.isnan(value) else value


def stages_line(config: TrialConfig) -> str:
    """Which of SFT and the reward model the trial trained, and which it was given."""

    def stage(name: str, steps: int, model: str) -> str:
        return f"{name} trained ({steps} steps)" if steps else f"{name} given ({model})"

    return "Stages: " + ", ".join((
        stage("SFT", config.sft.steps, config.models.actor),
        stage("reward model", config.rm.steps, config.models.critic),
        f"PPO trained ({config.ppo.steps} steps).",
    ))  # fmt: skip


def write_export(study, chosen: Configuration, out_dir: Path) -> Path:
    """Validate a configuration's DeepSpeed configs with DeepSpeed's parser, then write the
    files."""
    objectives = study.user_attrs.get(OBJECTIVES_ATTR, [])
    files = export_files(study.study_name, chosen, objectives)
    ranks = chosen.original.config.get("ranks", 1)
    for name, text in files.items():
        if name.startswith("ds_config_"):
            validate_ds_config(json.loads(text), ranks, name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out_dir / name).write_text(text)
    return out_dir


# What reproduce reads of study.json (an export before the 95% intervals lacks some).
_FIGURES = {"study", "trial", "objectives", "values", "runs", "sd", "ci95_half_width"}


def read_export(export_dir: Path) -> tuple[TrialConfig, dict[str, Any]]:
    """The trial config and study figures of an export folder."""
    for name in ("trial.yaml", "study.json"):
        if not (export_dir / name).is_file():
            raise InputError(f"{export_dir}: no {name} (is it a tunelab export?)")
    from tunelab.config import load_config

    config = load_config(export_dir / "trial.yaml")
    figures = read_mapping(export_dir / "study.json")
    if not set(figures) >= _FIGURES:
        raise InputError(f"{export_dir / 'study.json'}: lacks the study's intervals (written by "
                         "an older tunelab: export the trial again)")  # fmt: skip
    return config, figures


def rerun_seeds(seed: int, repeats: int) -> list[int]:
    """The seeds of `repeats` reruns of a trial: its own, then those its confirmation runs
    took in the study (tunelab.repeats.repeat_seed), so reruns measure noise as the study did."""
    return [repeat_seed(seed, ordinal) for ordinal in range(repeats)]


# Whether the study's and the reruns' 95% intervals overlap (tunelab.repeats.verdict).
_AGREEMENT = {Verdict.WITHIN: "overlap", Verdict.OUTSIDE: "disjoint",
              Verdict.UNKNOWN: "a side ran once"}  # fmt: skip


def reproduce_table(figures: dict[str, Any], runs: list[dict[str, float]]) -> pd.DataFrame:
    """Per objective: the study's mean and 95% half-width next to the reruns' (NaN below two
    runs), and whether the two intervals overlap."""
    from tunelab.report.render import HALF_WIDTH  # the report package draws with matplotlib

    rows = []
    for index, objective in enumerate(figures["objectives"]):
        metric = objective["metric"]
        study = Estimate(figures["values"][index], _nan(figures["sd"][index]),
                         figures["runs"][index], _nan(figures["ci95_half_width"][index]))
        rerun = estimate([run[metric] for run in runs if is_finite(run.get(metric))])
        rows.append({
            "objective": metric, "direction": objective["direction"],
            "study": study.mean, f"study{HALF_WIDTH}": study.half_width, "study runs": study.n,
            "reruns": rerun.mean, f"reruns{HALF_WIDTH}": rerun.half_width, "runs ok": rerun.n,
            "reruns / study": rerun.mean / study.mean if study.mean else math.nan,
            "95% intervals": _AGREEMENT[verdict(study, rerun)] if rerun.n else "no rerun ok",
        })  # fmt: skip
    return pd.DataFrame(rows)


def _nan(value: float | None) -> float:
    """JSON's null (one run: no spread) as NaN."""
    return math.nan if value is None else value


def reproduce_text(table: pd.DataFrame) -> str:
    """`reproduce_table` as text, each figure in its objective's unit (bytes as MiB/GiB)."""
    from tunelab.report.render import HALF_WIDTH, format_metric, format_number

    figures = ("study", f"study{HALF_WIDTH}", "reruns", f"reruns{HALF_WIDTH}")
    shown = table.assign(**{
        column: [format_metric(metric, value)
                 for metric, value in zip(table["objective"], table[column], strict=True)]
        for column in figures
    }, **{"reruns / study": table["reruns / study"].map(format_number)})  # fmt: skip
    return shown.to_string(index=False)
