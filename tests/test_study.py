"""Studies end to end: real Optuna, real trial subprocesses, real PostgreSQL and SQLite.

Trials use the tiny preset with few steps (about 10 s each, imports included).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import psutil
import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState

from tunelab.config import config_from_dict
from tunelab.errors import InputError
from tunelab.prelaunch import predicted_memory
from tunelab.presets import PRESETS
from tunelab.records import TrialAttr, from_frozen_trial, trial_metrics
from tunelab.report.data import stage_sources
from tunelab.spec import load_spec, trial_config
from tunelab.stagecache import STAGE_CACHE, claim_file, is_complete, stage_plan, try_claim
from tunelab.storage import open_storage
from tunelab.study import PGID_ATTR, create_or_resume

from .conftest import ROOT, TINY
from .helpers.workers import run_workers

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
FAST = {"sft.steps": 4, "rm.steps": 4, "ppo.steps": 4, "warmup_steps": 1,
        "data.train_size": 256, "data.eval_size": 16}  # fmt: skip
THROUGHPUT = [{"metric": "perf/ppo_e2e_tokens_per_s", "direction": "maximize"}]


def write_spec(folder, **fields) -> tuple[str, object]:
    """A spec in `folder` on a copy of the tiny trial config; returns (name, path)."""
    (folder / "trials").mkdir(parents=True, exist_ok=True)
    (folder / "trials" / "tiny.yaml").write_text(TINY.read_text())
    name = fields.pop("name", f"t-{uuid.uuid4().hex[:10]}")
    spec = {"name": name, "base": "trials/tiny.yaml", "objectives": THROUGHPUT,
            "base_overrides": {**FAST, **fields.pop("base_overrides", {})},
            "sampler": {"type": "random", "seed": 0}, **fields}  # fmt: skip
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return name, path


def tunelab(*args, timeout=600):
    argv = [sys.executable, "-m", "tunelab", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def by_baseline(study):
    return {t.user_attrs.get("baseline"): t for t in study.trials}


@pytest.fixture
def postgres_study_name():
    name = f"t-{uuid.uuid4().hex[:10]}"
    yield name
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=POSTGRES)


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for process in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return alive


def test_failures_are_classified_and_the_study_goes_on(tmp_path, postgres_study_name):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(PRESETS["tiny"].hf_config()))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    baselines = [
        {"name": "crash", "params": {"models.actor": str(broken), "precision": "bf16",
                                     "ppo.steps": 4}},
        {"name": "hang", "params": {"models.actor": "tiny", "precision": "bf16",
                                    "ppo.steps": 100000}},
        {"name": "hybrid", "params": {"models.actor": "tiny", "precision": "bf16",
                                      "ppo.steps": 4}, "overrides": {"hybrid_engine": True}},
        {"name": "ok", "params": {"models.actor": "tiny", "precision": "bf16", "ppo.steps": 4}},
    ]  # fmt: skip
    _, path = write_spec(
        tmp_path, name=postgres_study_name, budget={"trials": 4}, baselines=baselines,
        space={"models.actor": {"choices": ["tiny", str(broken)]},
               "precision": {"choices": ["bf16", "fp32"]},
               "ppo.steps": {"choices": [4, 100000]}},
        resources={"trial_timeout_s": 25},
    )  # fmt: skip
    run = tunelab("run", path, "--storage", POSTGRES, "--out", tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    study = optuna.load_study(study_name=postgres_study_name, storage=POSTGRES)
    trials = by_baseline(study)
    assert len(study.trials) == 4
    crash = trials["crash"]
    assert crash.state == TrialState.FAIL and crash.user_attrs["status"] == "error"
    assert crash.user_attrs["reason"]  # one line naming the exception
    assert os.path.exists(crash.user_attrs["log"])
    hang = trials["hang"]
    assert hang.state == TrialState.FAIL and hang.user_attrs["status"] == "timeout"
    assert "25 s trial timeout" in hang.user_attrs["reason"]
    assert _group_alive(hang.user_attrs[PGID_ATTR]) == []  # the whole group is gone
    hybrid = trials["hybrid"]
    assert hybrid.user_attrs["status"] == "unsupported"
    assert "not launched" in hybrid.user_attrs["reason"]
    ok = trials["ok"]  # ran after three failures
    assert ok.state == TrialState.COMPLETE
    assert ok.values[0] == ok.user_attrs["perf/ppo_e2e_tokens_per_s"] > 0  # one attr per metric
    assert study.metric_names == ["perf/ppo_e2e_tokens_per_s"]  # optuna-dashboard's labels
    assert ok.user_attrs["series"]["ppo/score"] and ok.user_attrs["config"]["precision"] == "bf16"
    assert "[" + postgres_study_name + "] 4/4 trials | ok 1, failed 3, pruned 0" in run.stderr


def test_sigkill_mid_study_then_resume_loses_nothing(tmp_path):
    name, path = write_spec(
        tmp_path, budget={"trials": 3},
        space={"actor.zero_stage": {"choices": [1, 2]}, "ppo.kl_coef": {"low": 0.05, "high": 0.2}},
    )  # fmt: skip
    out = tmp_path / "out"
    url = f"sqlite:///{out / 'study.db'}"
    log = tmp_path / "orchestrator.log"
    with log.open("wb") as sink:
        orchestrator = subprocess.Popen(
            [sys.executable, "-m", "tunelab", "run", str(path), "--out", str(out)], cwd=ROOT,
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    # Generous: a first run on a fresh machine builds DeepSpeed's ops before its first trial.
    deadline = time.monotonic() + 600
    done = running = []
    while time.monotonic() < deadline and orchestrator.poll() is None:
        time.sleep(0.5)
        try:  # read only: creating the storage here would race the orchestrator creating it
            trials = optuna.load_study(study_name=name, storage=open_storage(url, create=False))
            trials = trials.trials
        except (InputError, KeyError, sqlalchemy.exc.OperationalError):  # not there yet
            continue
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        running = [
            t for t in trials if t.state == TrialState.RUNNING and PGID_ATTR in t.user_attrs
        ]
        if done and running:
            break
    said = log.read_text()[-3000:]
    assert done and running, f"no finished and running trial at once; the orchestrator:\n{said}"
    completed_before = {t.number: t.values for t in done}
    victim = running[0]
    orchestrator.send_signal(signal.SIGKILL)
    orchestrator.wait()
    for _ in range(40):  # the trial notices its orchestrator is gone within a second
        if not _group_alive(victim.user_attrs[PGID_ATTR]):
            break
        time.sleep(0.25)
    assert _group_alive(victim.user_attrs[PGID_ATTR]) == []

    again = tunelab("run", path, "--out", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"trial {victim.number}: interrupted (its orchestrator " in again.stderr
    study = optuna.load_study(study_name=name, storage=url)
    trials = {t.number: t for t in study.trials}
    for number, values in completed_before.items():
        assert trials[number].state == TrialState.COMPLETE and trials[number].values == values
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    interrupted = trials[victim.number]
    assert interrupted.state == TrialState.FAIL
    assert interrupted.user_attrs["status"] == "interrupted"
    assert interrupted.user_attrs["reason"].startswith("its orchestrator ")
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].params == victim.params
    assert retry[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 3  # the budget
    # Running it once more resumes a finished study: nothing new.
    assert tunelab("run", path, "--out", out).returncode == 0
    assert len(optuna.load_study(study_name=name, storage=url).trials) == len(study.trials)


def test_three_workers_on_postgres_run_exactly_the_budget(tmp_path, postgres_study_name):
    _, path = write_spec(
        tmp_path, name=postgres_study_name, budget={"trials": 6},
        space={"ppo.kl_coef": {"low": 0.05, "high": 0.2}},
    )  # fmt: skip
    create_or_resume(load_spec(path), POSTGRES)
    run_workers(POSTGRES, postgres_study_name, tmp_path)
    study = optuna.load_study(study_name=postgres_study_name, storage=POSTGRES)
    assert len(study.trials) == 6
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({t.user_attrs["worker"] for t in study.trials}) >= 2


def test_workers_in_one_process_run_at_once(tmp_path):
    name, path = write_spec(
        tmp_path, budget={"trials": 2}, space={"ppo.kl_coef": {"low": 0.05, "high": 0.2}}
    )
    out = tmp_path / "out"
    run = tunelab("run", path, "--out", out, "--workers", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    first, second = optuna.load_study(study_name=name, storage=f"sqlite:///{out}/study.db").trials
    assert first.state == second.state == TrialState.COMPLETE
    assert first.datetime_start < second.datetime_complete
    assert second.datetime_start < first.datetime_complete  # overlapping


def test_two_workers_train_a_shared_stage_once(tmp_path):
    """The second worker's trial needs the SFT and RM the first is training: it waits for the
    cache entries instead of training them again, then starts from them."""
    name, path = write_spec(
        tmp_path, budget={"trials": 2}, measure=["ppo"],
        space={"ppo.kl_coef": {"low": 0.05, "high": 0.2}},
    )  # fmt: skip
    out = tmp_path / "out"
    run = tunelab("run", path, "--out", out, "--workers", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("; sft cached; rm cached; ppo start cached)") == 1
    assert run.stderr.count("; sft reused; rm reused; ppo start ") == 1
    assert "waiting for sft, which " in run.stderr
    assert sorted(p.name for p in (out / "stage-cache").iterdir()) == sorted(
        p.name for p in (out / "stage-cache").iterdir() if not p.name.endswith(".claim")
    )  # every claim released
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out}/study.db")
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert sum(trial_metrics(t.user_attrs).get("sft/reused", 0) for t in study.trials) == 1


def test_stale_claims_do_not_hold_a_study_up(tmp_path):
    """Claims left by an orchestrator that died on this node, or not refreshed by heartbeats
    for CLAIM_STALE_S (a node that died), are taken over: the trial trains both stages."""
    _, path = write_spec(
        tmp_path, budget={"trials": 1}, measure=["ppo"],
        space={"ppo.kl_coef": {"low": 0.05, "high": 0.2}},
    )  # fmt: skip
    out = tmp_path / "out"
    config = trial_config(load_spec(path), {"ppo.kl_coef": 0.1})
    plan = stage_plan(config, out / STAGE_CACHE, ("ppo",))
    sft, rm = (Path(plan[stage]["path"]) for stage in ("sft", "rm"))
    assert try_claim(sft, f"{socket.gethostname()}:999999999:1.00 trial 7") is None  # dead
    assert try_claim(rm, "other-node:1234:1.00 trial 8") is None
    os.utime(claim_file(rm), (1, 1))  # its heartbeats stopped long ago
    run = tunelab("run", path, "--out", out, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("; sft cached; rm cached; ppo start cached)") == 1
    assert "waiting" not in run.stderr
    assert not claim_file(sft).exists() and not claim_file(rm).exists()
    assert is_complete(sft) and is_complete(rm)


def test_memory_budget_prunes_before_launch(tmp_path):
    # A ZeRO-3 actor keeps DeepSpeed's 5e8-element reduce bucket (~1 GiB) for its whole life,
    # beside the ZeRO-2 critic's two buckets in backward (~1.9 GiB), with
    # on a CPU node no CUDA headroom: 2.8 GiB predicted; a ZeRO-2 actor frees its buckets
    # after backward: 1.9 GiB.
    name, path = write_spec(
        tmp_path, budget={"trials": 2}, memory_budget={"device_gib": 2.3},
        space={"actor.zero_stage": {"choices": [2, 3]}},
        baselines=[{"name": "z3", "params": {"actor.zero_stage": 3}},
                   {"name": "z2", "params": {"actor.zero_stage": 2}}],
    )  # fmt: skip
    out = tmp_path / "out"
    assert tunelab("run", path, "--out", out).returncode == 0
    trials = by_baseline(optuna.load_study(study_name=name, storage=f"sqlite:///{out}/study.db"))
    z3 = trials["z3"]
    assert z3.state == TrialState.PRUNED and z3.user_attrs["status"] == "pruned_memory"
    assert z3.user_attrs["predicted"]["mem/predicted_device_peak_bytes"] > 0.5 * 2**30
    assert z3.user_attrs["predicted"] == from_frozen_trial(z3).predicted  # never launched
    assert PGID_ATTR not in z3.user_attrs  # never launched
    assert not (out / "trials" / f"{z3.number:04d}").exists()
    assert trials["z2"].state == TrialState.COMPLETE


def test_median_pruner_stops_a_clearly_slow_trial(tmp_path):
    # Micro-batch 2 runs PPO at about a fifth of micro-batch 16's tokens/s on this machine.
    name, path = write_spec(
        tmp_path, budget={"trials": 3}, base_overrides={"ppo.steps": 12, "warmup_steps": 2},
        space={"batch.train_micro": {"choices": [2, 16]},
               "batch.generation_micro": {"same_as": "batch.train_micro"}},
        pruner={"type": "median", "options": {"n_startup_trials": 2, "n_warmup_steps": 3}},
        baselines=[{"name": "a", "params": {"batch.train_micro": 16}},
                   {"name": "b", "params": {"batch.train_micro": 16}},
                   {"name": "slow", "params": {"batch.train_micro": 2}}],
    )  # fmt: skip
    out = tmp_path / "out"
    assert tunelab("run", path, "--out", out).returncode == 0
    trials = by_baseline(optuna.load_study(study_name=name, storage=f"sqlite:///{out}/study.db"))
    slow = trials["slow"]
    assert slow.state == TrialState.PRUNED and slow.user_attrs["status"] == "pruned"
    assert "stopped early at ppo step" in slow.user_attrs["reason"]
    assert slow.intermediate_values  # reported through Optuna
    # ... which gives the pruned trial its last intermediate value as its value: tunelab's
    # record (report, export, confirmation) does not take it for the objective's
    assert slow.values and from_frozen_trial(slow).values is None
    assert trials["a"].state == trials["b"].state == TrialState.COMPLETE


def test_a_reward_study_reports_the_recent_gold_reward_to_its_pruner(tmp_path):
    # PPO steps as the fidelity of a reward objective: Optuna gets the trial's running gold
    # reward at every step (successive halving keeps a study's first trial: nothing to rank).
    name, path = write_spec(
        tmp_path, budget={"trials": 1}, objectives=[{"metric": "ppo/gold_gain",
                                                     "direction": "maximize"}],
        pruner={"type": "successive_halving", "metric": "ppo/gold_recent",
                "options": {"min_resource": 1, "reduction_factor": 2}},
    )  # fmt: skip
    out = tmp_path / "out"
    run = tunelab("run", path, "--out", out)
    assert run.returncode == 0, run.stderr[-3000:]
    (trial,) = optuna.load_study(study_name=name, storage=f"sqlite:///{out}/study.db").trials
    assert trial.state == TrialState.COMPLETE
    progress = [json.loads(line) for line in
                (out / "trials" / "0000" / "progress.jsonl").read_text().splitlines()]  # fmt: skip
    assert trial.intermediate_values == {p["step"]: p["ppo/gold_recent"] for p in progress}
    assert sorted(trial.intermediate_values) == [0, 1, 2, 3]


def test_a_trial_past_a_constraints_stop_line_is_stopped(tmp_path):
    # KL to the reference is above 0 once the actor has taken a step: with max 0 and no
    # margin, each trial stops at its first progress record showing it. The second reuses the
    # first's SFT and RM, which its record says though it stopped before writing metrics.
    name, path = write_spec(
        tmp_path, budget={"trials": 2}, base_overrides={"ppo.steps": 16}, measure=["ppo"],
        objectives=[{"metric": "ppo/gold_gain", "direction": "maximize"}],
        constraints=[{"metric": "ppo/kl_final", "max": 0.0, "stop_margin": 0.0}],
    )  # fmt: skip
    out = tmp_path / "out"
    run = tunelab("run", path, "--out", out)
    assert run.returncode == 0, run.stderr[-3000:]
    first, second = optuna.load_study(study_name=name, storage=f"sqlite:///{out}/study.db").trials
    for trial in (first, second):
        assert trial.state == TrialState.PRUNED and trial.user_attrs["status"] == "pruned"
        folder = out / "trials" / f"{trial.number:04d}"
        progress = [json.loads(line) for line in
                    (folder / "progress.jsonl").read_text().splitlines()]  # fmt: skip
        first_past = next(p for p in progress if p["ppo/kl_recent"] > 0)
        assert trial.user_attrs["reason"] == (
            f"stopped early at ppo step {first_past['step']}: ppo/kl_recent "
            f"{first_past['ppo/kl_recent']:.3g} is past the constraint ppo/kl_final <= 0 by "
            "more than 0%")
        assert progress[-1]["step"] < 15  # stopped before its last step
        assert not (folder / "metrics.json").exists()
    assert "sft/reused" not in trial_metrics(first.user_attrs)
    assert trial_metrics(second.user_attrs) == {"sft/reused": 1, "rm/reused": 1,
                                                "ppo/start_reused": 1}  # fmt: skip
    sources = stage_sources([from_frozen_trial(t) for t in (first, second)])
    assert sources["sft"]["reused"] == sources["rm"]["reused"] == 1
    assert sources["ppo_start"] == {"reused": 1}


def test_a_grid_study_stops_once_its_grid_is_run(tmp_path):
    """Optuna's GridSampler calls Study.stop() after the last point, which raises outside
    Study.optimize; tunelab's orchestrator stops asking instead. The trials are never launched
    (the hybrid engine is refused), so only the orchestration runs."""
    name, path = write_spec(
        tmp_path, budget={"trials": 5}, sampler={"type": "grid", "seed": 0},
        space={"ppo.kl_coef": {"choices": [0.05, 0.1, 0.2]}},
        base_overrides={"hybrid_engine": True},
    )  # fmt: skip
    run = tunelab("run", path, "--out", tmp_path / "out", timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"[{name}] stopped: every point of the grid has been run" in run.stderr
    study = optuna.load_study(
        study_name=name, storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}"
    )
    assert sorted(t.params["ppo.kl_coef"] for t in study.trials) == [0.05, 0.1, 0.2]


def test_a_study_that_measures_ppo_trains_sft_and_rm_once(tmp_path):
    name, path = write_spec(
        tmp_path, budget={"trials": 3}, measure=["ppo"],
        space={"ppo.kl_coef": {"low": 0.05, "high": 0.2}},
    )  # fmt: skip
    out = tmp_path / "out"
    run = tunelab("run", path, "--out", out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trial 0: started (ppo.kl_coef=" in run.stderr
    # Trial 0 trains SFT and RM, evaluates PPO's start and keeps them; the others read them.
    assert run.stderr.count("; sft cached; rm cached; ppo start cached)") == 1
    assert run.stderr.count("; sft reused; rm reused; ppo start reused)") == 2
    assert sorted(p.name.split("-")[0] for p in (out / "stage-cache").iterdir()) == [
        "ppo_start", "rm", "sft"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out}/study.db")
    first, *later = sorted(study.trials, key=lambda t: t.number)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert "sft/reused" not in trial_metrics(first.user_attrs)
    for trial in later:
        metrics = trial_metrics(trial.user_attrs)
        assert metrics["sft/reused"] == metrics["rm/reused"] == metrics["ppo/start_reused"] == 1
        for name in ("sft/loss_final", "rm/eval_accuracy", "ppo/gold_start", "ppo/score_start"):
            assert metrics[name] == trial_metrics(first.user_attrs)[name], name
    for trial in study.trials:
        # One prediction per trial: the trial's own, the one the orchestrator checked before
        # launch (same function, same inputs); reused stages did not run, so it leaves them out.
        recorded = from_frozen_trial(trial).predicted
        assert TrialAttr.PREDICTED not in trial.user_attrs
        trained_here = trial.number == first.number
        reused = [] if trained_here else ["sft", "rm"]
        config = config_from_dict(trial.user_attrs["config"])
        assert recorded == predicted_memory(config, False, reused).flat_metrics()
        assert ("mem/sft/predicted_device_peak_bytes" in recorded) == trained_here
