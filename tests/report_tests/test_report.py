"""write_report / write_comparison end to end: the files, their numbers against the study's
storage, and index.html opened in a real headless Chromium (Debian's /usr/bin/chromium)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from tests.browser import assert_page_is_whole, needs_chromium
from tests.report_tests.studies import CPU_OBJECTIVES, MIB, cpu_study, gpu_study
from tunelab.records import OBJECTIVES_ATTR
from tunelab.report import write_comparison, write_report

optuna.logging.set_verbosity(optuna.logging.WARNING)
FIGURES = ("pareto.png", "time.png", "rewards.png", "memory.png",
           "history_perf_ppo_e2e_tokens_per_s.png", "parallel_mem_peak_host_rss_bytes.png")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> optuna.Study:
    """The CPU study in SQLite, loaded back as the CLI would (attrs go through JSON)."""
    storage = f"sqlite:///{tmp_path_factory.mktemp('storage') / 'study.db'}"
    cpu_study(storage=storage)
    return optuna.load_study(study_name="smoke", storage=storage)


@pytest.fixture(scope="module")
def report(study, tmp_path_factory) -> Path:
    return write_report(study, tmp_path_factory.mktemp("reports") / study.study_name)


def test_report_writes_every_file(report):
    assert report.name == "index.html"
    written = {path.name for path in report.parent.iterdir()}
    assert {"index.html", "report.md", "trials.csv", *FIGURES} <= written
    for name in FIGURES:
        size = (report.parent / name).stat().st_size
        assert 5_000 < size < 200_000, (name, size)  # modest figures
        assert (report.parent / name).read_bytes().startswith(b"\x89PNG")


def test_markdown_states_the_storage_best_values_and_references_the_pngs(study, report):
    text = (report.parent / "report.md").read_text()
    best_throughput = max(
        t.values[0] for t in study.trials if t.state.name == "COMPLETE" and not t.constraints
    )
    assert best_throughput == 5213
    assert "Best perf/ppo_e2e_tokens_per_s: 5213 tokens/s (trial #4: " in text
    assert "1.84x the baseline 'dschat-single-gpu' (2831 tokens/s); single runs" in text
    assert "Best mem/peak_host_rss_bytes: 480 MiB (trial #5: " in text
    assert "20% less than the baseline 'dschat-single-gpu' (600 MiB); single runs" in text
    assert "| FAIL | oom | out of memory in ppo_train (host RSS 2.1 GiB) | 2 | 3, 8 |" in text
    for name in FIGURES:
        assert f"]({name})" in text
    # 7 complete trials: below PED-ANOVA's 41, so no importance figure.
    assert "too few complete trials for importance" in text and "importance.png" not in text
    # A CPU study: stage peaks (device vs host RSS) are not compared, model states are.
    assert "Stage peaks are compared on a GPU only" in text
    assert "Measured / predicted peak per stage" not in text
    assert "Measured / predicted model states per engine" in text


def test_optunas_plots_leave_matplotlib_style_as_it_was(report):
    import matplotlib

    assert matplotlib.rcParams["axes.facecolor"] == "white"  # Optuna switches to ggplot


def test_trials_csv_matches_the_storage(study, report):
    table = pd.read_csv(report.parent / "trials.csv")
    assert len(table) == len(study.trials)
    assert table["number"].tolist() == [t.number for t in study.trials]
    assert table["state"].tolist() == [t.state.name for t in study.trials]
    by_number = table.set_index("number")
    for trial in study.trials:
        if trial.values is not None:
            assert by_number.loc[trial.number, CPU_OBJECTIVES[0]["metric"]] == trial.values[0]
            assert by_number.loc[trial.number, CPU_OBJECTIVES[1]["metric"]] == trial.values[1]
        assert by_number.loc[trial.number, "actor.zero_stage"] == trial.params["actor.zero_stage"]
    assert by_number.loc[4, "mem/ppo_train/peak_host_rss_bytes"] == 700 * MIB
    assert by_number.loc[3, "reason"] == study.trials[3].user_attrs["reason"]
    assert by_number.loc[0, "baseline"] == "dschat-single-gpu"


@pytest.mark.parametrize("trials", [[], [3, 7]], ids=["empty", "failed-and-pruned"])
def test_report_of_a_study_without_complete_trials(trials, tmp_path):
    study = optuna.create_study(study_name="empty", directions=["maximize", "minimize"])
    study.set_user_attr(OBJECTIVES_ATTR, CPU_OBJECTIVES)
    for number in trials:
        study.add_trial(cpu_study().trials[number])
    index = write_report(study, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "No complete, feasible trial for perf/ppo_e2e_tokens_per_s yet." in text
    assert "too few complete trials for importance" in text
    assert "this study has 0" in text
    assert "<img" not in index.read_text()
    assert len(pd.read_csv(tmp_path / "trials.csv")) == len(trials)


def test_comparison_writes_every_file(tmp_path):
    index = write_comparison([cpu_study(), gpu_study()], tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"index.html", "report.md", "trials.csv"}
    assert (tmp_path / "pareto.png").stat().st_size > 5_000
    table = pd.read_csv(tmp_path / "trials.csv")
    assert table.groupby("study").size().to_dict() == {"smoke": 11, "h200": 4}
    text = (tmp_path / "report.md").read_text()
    assert "| smoke | 11 | 7 | 3 | 1 | 5213 tokens/s |" in text
    assert "| h200 | 4 | 3 | 1 | 0 | 41000 tokens/s |" in text
    assert index.name == "index.html"


def test_report_package_never_imports_torch():
    code = "import sys, tunelab.report\nassert 'torch' not in sys.modules, 'torch imported'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@needs_chromium
def test_report_opens_in_chromium(report, chromium):
    figures = len(list(report.parent.glob("*.png")))  # every figure written, embedded once
    assert figures >= len(FIGURES)
    screenshot = report.parent / "screenshot.png"
    assert_page_is_whole(chromium(report, screenshot), images=figures)
    assert screenshot.stat().st_size > 0


@needs_chromium
def test_comparison_opens_in_chromium(tmp_path, chromium):
    index = write_comparison([cpu_study(), gpu_study("a100")], tmp_path)
    screenshot = tmp_path / "screenshot.png"
    assert_page_is_whole(chromium(index, screenshot), images=1)
    assert screenshot.stat().st_size > 0


def test_the_report_command_a_run_prints_writes_into_that_runs_folder(tmp_path, monkeypatch):
    """`tunelab run SPEC --storage j.log --out j` prints a report command; run as printed from
    anywhere, it writes j/report, not runs/<study>/report (another run's folder)."""
    import shlex

    from tunelab.cli import main, report_command
    from tunelab.storage import default_url, open_storage

    journal, out = tmp_path / "j.log", tmp_path / "j"
    cpu_study(storage=open_storage(str(journal)))
    monkeypatch.chdir(tmp_path)
    printed = report_command(str(journal), out, "smoke")
    argv = shlex.split(printed)
    assert argv[:2] == ["tunelab", "report"] and argv[-2:] == ["--out", str(out / "report")]
    assert main(argv[1:]) == 0
    assert (out / "report" / "index.html").is_file()
    assert not (tmp_path / "runs").exists()
    # In the study's own folder (its default SQLite file) the folder alone says it.
    assert report_command(default_url(out), out, "smoke") == f"tunelab report {out}"


def test_compare_of_two_runs_of_one_spec_names_them_by_folder(tmp_path, monkeypatch):
    """Two copies of one spec (both studies named smoke) run into runs/h100 and runs/a100:
    the comparison labels them h100 and a100 and goes to runs/compare-h100-vs-a100/."""
    from tunelab.cli import main
    from tunelab.storage import default_url

    for folder in ("h100", "a100"):
        (tmp_path / "runs" / folder).mkdir(parents=True)
        cpu_study(storage=default_url(tmp_path / "runs" / folder))
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "runs/h100", "runs/a100/"]) == 0
    out = tmp_path / "runs" / "compare-h100-vs-a100"
    assert set(pd.read_csv(out / "trials.csv")["study"]) == {"h100", "a100"}
    assert "# tunelab comparison: h100 vs a100" in (out / "report.md").read_text()
