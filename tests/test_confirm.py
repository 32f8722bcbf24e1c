"""Confirmation runs end to end: a real study on the tiny preset, its report and export."""

from __future__ import annotations

import json

import optuna

from tunelab.storage import default_url

from .test_study import tunelab, write_spec


def test_the_budget_then_confirmation_runs_with_their_own_seeds(tmp_path):
    name, path = write_spec(
        tmp_path, budget={"trials": 1}, baselines=[{"name": "defaults", "params": {}}],
        confirm={"top_k": 1, "repeats": 2},
    )  # fmt: skip
    out = tmp_path / "out"
    run = tunelab("run", path, "--out", out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "confirmation runs 1/1" in run.stderr
    # The last progress line's best is the configuration's mean, as report and export take it.
    last = [line for line in run.stderr.splitlines() if line.startswith(f"[{name}]")][-1]
    assert "(#0, mean of 2)" in last
    study = optuna.load_study(study_name=name, storage=default_url(out))
    original, repeat = study.trials
    assert original.user_attrs.get("repeat_of") is None
    assert repeat.user_attrs["repeat_of"] == 0 and repeat.user_attrs["baseline"] == "defaults"
    assert repeat.state == optuna.trial.TrialState.COMPLETE
    assert repeat.user_attrs["config"]["seed"] == original.user_attrs["config"]["seed"] + 1

    again = tunelab("run", path, "--out", out)  # finished: nothing more to run
    assert again.returncode == 0 and len(optuna.load_study(
        study_name=name, storage=default_url(out)).trials) == 2  # fmt: skip

    assert tunelab("report", out).returncode == 0
    text = (out / "report" / "report.md").read_text()
    assert "(mean of 2 runs, 95% interval) (trial #0: no searched knobs)" in text
    exported = tunelab("export", out)
    assert exported.returncode == 0, exported.stderr
    figures = json.loads((out / "export-trial0" / "study.json").read_text())
    assert figures["runs"] == [2] and figures["trials"] == [0, 1]
    assert figures["values"][0] == (original.values[0] + repeat.values[0]) / 2
