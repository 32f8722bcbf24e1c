"""README's first command and what follows it: `tunelab run studies/smoke.yaml`, run again
(resume), `tunelab report` opened in Chromium, `tunelab export`, `tunelab reproduce`.

The smoke study runs once for the module (about 2.5 minutes on 2 cores).
"""

from __future__ import annotations

import subprocess
import sys

import optuna
import pandas as pd
import pytest

from tests.browser import assert_page_is_whole, needs_chromium
from tunelab.records import OBJECTIVES_ATTR, from_frozen_trial
from tunelab.repeats import ranked_configurations
from tunelab.report.render import format_metric

from .conftest import ROOT


def tunelab(*args, timeout=900):
    argv = [sys.executable, "-m", "tunelab", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    run = tunelab("run", ROOT / "studies" / "smoke.yaml", "--out", out)
    assert run.returncode == 0, run.stderr[-3000:]
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{out / 'study.db'}")
    return out, study, run.stderr


def test_smoke_covers_the_space_and_classifies_the_hybrid_engine(smoke):
    _, study, log = smoke
    records = [from_frozen_trial(t) for t in study.trials]
    assert len(records) >= 8
    ok = [r for r in records if r.status == "ok"]
    assert {r.config["actor"]["zero_stage"] for r in ok} >= {0, 2, 3}
    assert {r.config["precision"] for r in ok} >= {"bf16", "fp32"}
    assert "cpu" in {r.config["actor"]["offload_optimizer"] for r in ok}
    assert {r.config["actor"]["lora_rank"] for r in ok} == {0, 8}
    hybrid = [r for r in records if r.config.get("hybrid_engine")]
    assert [r.status for r in hybrid] == ["unsupported"]  # the baseline, never launched
    assert "[smoke] 10/10 trials" in log
    repeats = [r for r in records if r.repeat_of is not None]
    assert repeats and all(r.status == "ok" for r in repeats)
    assert "confirmation runs" in log


def test_running_it_again_resumes(smoke):
    out, study, _ = smoke
    again = tunelab("run", ROOT / "studies" / "smoke.yaml", "--out", out, timeout=120)
    assert again.returncode == 0
    assert "[smoke] 10/10 trials" in again.stderr
    reloaded = optuna.load_study(study_name="smoke", storage=f"sqlite:///{out / 'study.db'}")
    assert len(reloaded.trials) == len(study.trials)  # nothing repeated


@needs_chromium
def test_report_opens_in_chromium_and_matches_storage(smoke, chromium, tmp_path):
    out, study, _ = smoke
    run = tunelab("report", out, "--out", tmp_path / "report", timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    index = tmp_path / "report" / "index.html"
    check = chromium(index, tmp_path / "report" / "screenshot.png")
    assert_page_is_whole(check, images=len(check.image_widths))
    assert len(check.image_widths) >= 4
    assert (tmp_path / "report" / "screenshot.png").stat().st_size > 0
    # report.md states the best trial of each objective as the storage has it.
    text = (tmp_path / "report" / "report.md").read_text()
    records = [from_frozen_trial(t) for t in study.trials]
    for index_, objective in enumerate(study.user_attrs[OBJECTIVES_ATTR]):
        best, estimate = ranked_configurations(records, index_, objective["direction"])[0]
        assert estimate.n == 3  # confirmed: the headline is a mean with its interval
        value = format_metric(objective["metric"], estimate.mean)
        assert f"Best {objective['metric']}: {value} ± " in text
        assert f"(mean of 3 runs, 95% interval) (trial #{best.number}:" in text
    assert "noise" in text  # every headline against the baseline says where it stands
    table = pd.read_csv(tmp_path / "report" / "trials.csv").set_index("number")
    assert len(table) == len(study.trials)
    for trial in study.trials:
        assert table.loc[trial.number, "state"] == trial.state.name
        if trial.values:
            metric = study.user_attrs[OBJECTIVES_ATTR][0]["metric"]
            assert table.loc[trial.number, metric] == pytest.approx(trial.values[0])


def test_export_then_reproduce_prints_the_table(smoke, tmp_path):
    out, study, _ = smoke
    export = tmp_path / "export"
    run = tunelab("export", out, "--out", export, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    best, _ = ranked_configurations([from_frozen_trial(t) for t in study.trials], 0, "maximize")[0]
    assert f"exported trial {best.number} of smoke" in run.stdout
    reproduce = tunelab("reproduce", export, "--repeats", "1", "--out", tmp_path / "reruns")
    assert reproduce.returncode == 0, reproduce.stderr[-2000:]
    lines = reproduce.stdout.splitlines()
    assert lines[0].startswith(f"study smoke, trial {best.number}, 1 repeats, seeds ")
    assert lines[1].split()[:6] == ["objective", "direction", "study", "study", "±", "95%"]
    assert any(line.split()[0] == "perf/ppo_e2e_tokens_per_s" for line in lines[2:])
