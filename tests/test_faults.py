"""Faults of issue 12, each reproduced for real: workers on PostgreSQL, a storage connection cut
mid-study (for a moment, then for good), fresh databases raced by several processes, trials
killed by hand and by the kernel's OOM killer, heartbeat-failed and over-retried trials,
read-only commands, unwritable and full output folders, MySQL's lock timeout, passwords."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState

from tunelab.cli import main
from tunelab.errors import InputError, StorageFault
from tunelab.launcher import collect_outcome, launch_trial
from tunelab.records import trial_metrics
from tunelab.spec import load_spec
from tunelab.storage import MAX_RETRY, open_storage, storage_lock
from tunelab.study import (
    OWNER_FILE,
    PGID_ATTR,
    Orchestrator,
    create_or_resume,
    interrupt,
    progress_line,
    suggest_params,
)

from .conftest import ROOT, TINY
from .report_tests.studies import cpu_study
from .test_study import FAST, by_baseline, write_spec

POSTGRES = "postgresql://postgres@127.0.0.1:5432"
MARIADB = "mysql+pymysql://root@127.0.0.1:3306"


def tunelab(*args, timeout=600, cwd=ROOT):
    argv = [sys.executable, "-m", "tunelab", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def popen(*args):
    return subprocess.Popen([sys.executable, "-m", "tunelab", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def admin(server: str, *statements: str) -> None:
    engine = sqlalchemy.create_engine(f"{server}/test", isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        for statement in statements:
            connection.execute(sqlalchemy.text(statement))
    engine.dispose()


@contextlib.contextmanager
def fresh_database(server: str, owner: str | None = None):
    """A new, empty database on the server (dropped afterwards); yields its URL."""
    name = f"tl_{uuid.uuid4().hex[:10]}"
    if "postgresql" in server:
        if owner:
            admin(server, f"CREATE ROLE {owner} LOGIN", f"CREATE DATABASE {name} OWNER {owner}")
        else:
            admin(server, f"CREATE DATABASE {name}")
        user = owner or "postgres"
        url = server.replace("postgres@", f"{user}@") + f"/{name}"
    else:
        admin(server, f"CREATE DATABASE {name}")
        url = f"{server}/{name}"
    try:
        yield url
    finally:
        if "postgresql" in server:
            admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)",
                  *([f"DROP ROLE IF EXISTS {owner}"] if owner else []))  # fmt: skip
        else:
            admin(server, f"DROP DATABASE IF EXISTS {name}")


def unsupported_spec(folder: Path, trials: int, **fields):
    """A spec whose trials ask for DeepSpeed's hybrid engine: classified unsupported on a CPU,
    never launched (the orchestrators and the storage are exercised, not the pipeline)."""
    return write_spec(folder, budget={"trials": trials},
                      base_overrides={"hybrid_engine": True},
                      space={"ppo.kl_coef": {"low": 0.01, "high": 0.5},
                             "actor.lora_rank": {"choices": [0, 4, 8]}},
                      sampler={"type": "tpe", "seed": 0}, **fields)  # fmt: skip


def wait_for_running_trial(url: str, name: str, deadline_s: float = 300):
    """The first trial that is RUNNING with its process group launched."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        # Read only: creating Optuna's tables here would race the orchestrator creating them.
        with contextlib.suppress(InputError, KeyError, sqlalchemy.exc.SQLAlchemyError):
            storage = open_storage(url, create=False)
            for trial in optuna.load_study(study_name=name, storage=storage).trials:
                if trial.state == TrialState.RUNNING and trial.user_attrs.get(PGID_ATTR):
                    return trial
    raise AssertionError("no trial started")


# -- workers --------------------------------------------------------------------------------


def test_three_processes_on_postgres_sample_distinct_parameters(tmp_path):
    with fresh_database(POSTGRES) as url:
        name, path = unsupported_spec(tmp_path, trials=12)
        runs = [popen("run", path, "--storage", url, "--out", tmp_path / f"n{i}")
                for i in range(3)]  # fmt: skip
        for run in runs:
            _, err = run.communicate(timeout=300)
            assert run.returncode == 0, err[-3000:]
        study = optuna.load_study(study_name=name, storage=url)
        assert len(study.trials) == 12 and study.user_attrs["tunelab:processes"] == 3
        assert len({t.user_attrs["worker"] for t in study.trials}) >= 2  # (a late one may idle)
        params = [tuple(sorted(t.params.items())) for t in study.trials]
        assert len(set(params)) == len(params)  # no two trials sampled the same point


# -- fresh databases ------------------------------------------------------------------------


@pytest.mark.parametrize("server", [POSTGRES, MARIADB], ids=["postgresql", "mariadb"])
def test_processes_starting_at_once_on_an_empty_database(tmp_path, server):
    with fresh_database(server) as url:
        name, path = unsupported_spec(tmp_path, trials=6)
        runs = [popen("run", path, "--storage", url, "--out", tmp_path / f"n{i}")
                for i in range(3)]  # fmt: skip
        for run in runs:
            _, err = run.communicate(timeout=300)
            assert run.returncode == 0, err[-3000:]
        study = optuna.load_study(study_name=name, storage=url)
        assert sorted(t.number for t in study.trials) == list(range(6))
        assert {t.user_attrs["status"] for t in study.trials} == {"unsupported"}


def test_a_reader_never_writes_into_tables_a_creator_is_making(tmp_path):
    """Optuna's RDBStorage writes the alembic version row when it finds none; a read-only
    open (report, a test polling a study) of a database whose `studies` table exists but whose
    creation is unfinished must wait for the creator, not take that row (the creator then
    failed with a UNIQUE constraint: the CI failure of the SIGKILL study test)."""
    import threading

    import sqlalchemy
    from optuna.storages._rdb import models

    from tunelab.storage import open_storage, storage_lock

    url = f"sqlite:///{tmp_path / 'study.db'}"
    opened = threading.Event()
    with storage_lock(url, "tunelab:create-tables"):  # a creator, halfway
        engine = sqlalchemy.create_engine(url)
        models.BaseModel.metadata.create_all(engine)  # tables, but no alembic version yet
        reader = threading.Thread(target=lambda: (open_storage(url, create=False), opened.set()))
        reader.start()
        assert not opened.wait(1.0)  # the reader waits for the creator
        with engine.connect() as connection:
            assert not sqlalchemy.inspect(connection).has_table("alembic_version")
        engine.dispose()
        optuna.storages.RDBStorage(url)  # the creator finishes: the version row
    reader.join(timeout=30)
    assert opened.is_set()


# -- storage faults mid-study ---------------------------------------------------------------


def test_a_connection_cut_mid_trial_loses_nothing(tmp_path):
    with fresh_database(POSTGRES) as database:
        application = f"tl-{uuid.uuid4().hex[:8]}"
        url = f"{database}?application_name={application}"
        name, path = write_spec(tmp_path, budget={"trials": 2},
                                space={"ppo.kl_coef": {"low": 0.05, "high": 0.2}})  # fmt: skip
        run = popen("run", path, "--storage", url, "--out", tmp_path / "out")
        wait_for_running_trial(url, name)
        admin(POSTGRES, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        f"WHERE application_name = '{application}'")  # fmt: skip
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        study = optuna.load_study(study_name=name, storage=database)
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
        for trial in study.trials:
            measured = json.loads((tmp_path / "out" / "trials" / f"{trial.number:04d}" /
                                   "metrics.json").read_text())["metrics"]  # fmt: skip
            assert trial.values[0] == measured["perf/ppo_e2e_tokens_per_s"]


def test_a_storage_that_stays_down_ends_the_study_and_keeps_the_outcome(tmp_path):
    role = f"tl_{uuid.uuid4().hex[:8]}"
    with fresh_database(POSTGRES, owner=role) as url:
        name, path = write_spec(tmp_path, budget={"trials": 2},
                                space={"ppo.kl_coef": {"low": 0.05, "high": 0.2}})  # fmt: skip
        out = tmp_path / "out"
        run = popen("run", path, "--storage", url, "--out", out)
        victim = wait_for_running_trial(url, name)
        # The database refuses the study's role from now on, and its connections are cut.
        admin(
            POSTGRES,
            f"ALTER ROLE {role} NOLOGIN",
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'",
        )
        _, err = run.communicate(timeout=300)
        assert run.returncode == 1, err[-3000:]
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        saved = out / "trials" / f"{victim.number:04d}" / "outcome.json"
        assert last.startswith(f"tunelab: error: recording trial {victim.number}: storage ")
        assert f"its outcome is kept in {saved} and will be recorded by the next run" in last
        outcome = json.loads(saved.read_text())
        measured = json.loads(saved.with_name("metrics.json").read_text())["metrics"]
        assert outcome["status"] == "ok" and trial_metrics(outcome["attrs"]) == measured

        admin(POSTGRES, f"ALTER ROLE {role} LOGIN")
        again = tunelab("run", path, "--storage", url, "--out", out)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"trial {victim.number}: ok, recorded from {saved}" in again.stderr
        study = optuna.load_study(study_name=name, storage=url)
        recorded = study.trials[victim.number]
        assert recorded.state == TrialState.COMPLETE
        assert recorded.values[0] == measured["perf/ppo_e2e_tokens_per_s"]
        assert trial_metrics(recorded.user_attrs) == measured
        assert recorded.user_attrs["perf/ppo_e2e_tokens_per_s"] == recorded.values[0]  # flat
        assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 2  # the budget


# -- killed, oom, interrupted ---------------------------------------------------------------


def test_a_study_stopped_by_sigterm_records_its_running_trial_as_interrupted(tmp_path):
    """SIGTERM (like Ctrl-C) kills the running trial, records it as interrupted and enqueues its
    parameters again, before the orchestrator exits 130."""
    name, path = write_spec(tmp_path, budget={"trials": 2},
                            space={"ppo.kl_coef": {"low": 0.05, "high": 0.2}})  # fmt: skip
    out = tmp_path / "out"
    url = f"sqlite:///{out / 'study.db'}"
    run = popen("run", path, "--out", out)
    victim = wait_for_running_trial(url, name)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-3000:]
    assert f"trial {victim.number}: interrupted (the orchestrator was stopped)" in err
    trials = optuna.load_study(study_name=name, storage=url).trials
    assert trials[victim.number].state == TrialState.FAIL
    assert trials[victim.number].user_attrs["status"] == "interrupted"
    again = [t for t in trials if t.state == TrialState.WAITING]
    assert [t.params for t in again] == [trials[victim.number].params]


def test_a_trial_killed_by_hand_is_killed_not_oom(tmp_path, tiny_config):
    # Enough PPO steps after the first progress record that the trial is still running when
    # the launcher (polling every 0.2 s) reads it.
    fast = {**FAST, "ppo.steps": 60}
    config = tiny_config(*(f"{k}={v}" for k, v in fast.items()))

    def kill_at_first_step(record):
        os.killpg(group[0], signal.SIGKILL)
        return False

    group = []
    outcome = launch_trial(config, tmp_path / "t", on_start=group.append,
                           on_progress=kill_at_first_step)  # fmt: skip
    assert outcome.status == "killed"
    assert outcome.reason == (
        "ended by SIGKILL from outside tunelab (no OOM kill in the kernel log or the memory "
        "cgroup)"
    )


def _memory_cgroup() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory", path.lstrip("/"))
    return None


@pytest.fixture
def small_memory_cgroup():
    """A child memory cgroup (v1) of 300 MiB; skipped where cgroups cannot be created."""
    parent = _memory_cgroup()
    child = parent / f"tunelab-test-{uuid.uuid4().hex[:8]}" if parent else None
    try:
        child.mkdir()
        (child / "memory.limit_in_bytes").write_text(str(300 * 2**20))
    except (OSError, AttributeError):
        pytest.skip("cannot create a memory cgroup here (needs root and cgroup v1 memory)")
    yield child
    for _ in range(50):
        with contextlib.suppress(OSError):
            child.rmdir()
            return
        time.sleep(0.1)


def test_a_trial_the_kernel_kills_for_memory_is_oom_with_evidence(tmp_path, small_memory_cgroup):
    procs = small_memory_cgroup / "cgroup.procs"
    run = subprocess.run(
        [sys.executable, "-m", "tunelab", "trial", str(TINY), "--out", str(tmp_path / "t")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        preexec_fn=lambda: procs.write_text(str(os.getpid())),
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]
    status = run.stdout.splitlines()[0]
    assert status.startswith("status oom: killed by SIGKILL ("), status
    assert "kernel log: " in status or "the memory cgroup counted" in status


@pytest.mark.parametrize(
    ("returncode", "log", "evidence", "status", "reason"),
    [
        (-signal.SIGKILL, "", "kernel log: Killed process 7", "oom",
         "killed by SIGKILL (kernel log: Killed process 7)"),
        (-signal.SIGKILL, "torch.OutOfMemoryError: CUDA out of memory.", None, "oom",
         "ended by SIGKILL; the log reports an allocation failure"),
        (-signal.SIGABRT, "terminate called after throwing an instance of 'std::bad_alloc'",
         None, "oom", "ended by SIGABRT; the log reports an allocation failure"),
        (-signal.SIGSEGV, "step 3", None, "error", "trial process crashed (SIGSEGV); see its log"),
        (-signal.SIGTERM, "step 3", None, "killed", "ended by SIGTERM from outside tunelab (no "
         "OOM kill in the kernel log or the memory cgroup)"),
        (1, "MemoryError", None, "oom", "trial process exited with code 1; log reports OOM"),
        (1, "step 3", None, "error", "trial process exited with code 1 and no metrics"),
    ],
)  # fmt: skip
def test_a_trial_that_left_no_metrics_is_classified_by_its_evidence(
    tmp_path, returncode, log, evidence, status, reason
):
    """oom only with evidence (the kernel's, or an allocation failure in the trial's log),
    error for a crash (a signal the process caused), killed for a signal from outside."""
    (tmp_path / "trial.log").write_text(f"loading\n{log}\n")
    outcome = collect_outcome(tmp_path, returncode, 1.0, evidence)
    assert (outcome.status, outcome.reason) == (status, reason)


def test_interrupted_by_a_stopped_heartbeat_carries_its_status_and_reason(tmp_path):
    name, path = unsupported_spec(tmp_path, trials=1)
    out = tmp_path / "out"
    url = f"sqlite:///{out / 'study.db'}"
    loaded = load_spec(path)
    study = create_or_resume(loaded, url)
    trial = study.ask()
    params = suggest_params(trial, loaded)
    trial.set_user_attr("worker", "another-node:4242:1700000000.00")
    study._storage.record_heartbeat(trial._trial_id)
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:  # that node went silent an hour ago
        connection.execute(sqlalchemy.text(
            "UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour')"))  # fmt: skip
    engine.dispose()

    run = tunelab("run", path, "--out", out)
    assert run.returncode == 0, run.stderr[-3000:]
    trials = optuna.load_study(study_name=name, storage=url).trials
    failed = trials[trial.number]
    assert failed.state == TrialState.FAIL and failed.user_attrs["status"] == "interrupted"
    assert failed.user_attrs["reason"] == (
        "the heartbeat of another-node:4242:1700000000.00 stopped for over 120 s"
    )
    assert f"trial {trial.number}: interrupted (the heartbeat of another-node" in run.stderr
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == trial.number]
    assert len(retry) == 1 and retry[0].params == params
    assert retry[0].user_attrs["status"] == "unsupported"  # it ran again, and counts


def test_the_retry_cap_is_stated_and_reported(tmp_path):
    _, path = unsupported_spec(tmp_path, trials=3)
    loaded = load_spec(path)
    study = create_or_resume(loaded, f"sqlite:///{tmp_path / 'study.db'}")
    reasons = []
    for _ in range(MAX_RETRY + 1):  # the first run and its MAX_RETRY retries
        trial = study.ask()
        suggest_params(trial, loaded)
        reasons.append(interrupt(study, trial._trial_id, "its orchestrator died"))
    assert reasons[:-1] == ["its orchestrator died"] * MAX_RETRY
    assert reasons[-1] == (
        f"its orchestrator died; not run again: retried {MAX_RETRY} times already, the cap "
        f"(MAX_RETRY={MAX_RETRY} in tunelab/storage.py)"
    )
    assert not study.get_trials(states=(TrialState.WAITING,))  # nothing enqueued past the cap
    assert all(t.user_attrs["status"] == "interrupted" for t in study.trials)
    line = progress_line(loaded, study.trials, 0.0, [], 1)
    assert f"1 interrupted past the retry cap ({MAX_RETRY})" in line


def test_trial_folders_are_recorded_from_the_root(tmp_path, monkeypatch):
    """A relative --out is recorded absolute, so a saved outcome or a log is found from any
    directory the study is resumed or reported from."""
    _, path = unsupported_spec(tmp_path, trials=1)
    loaded = load_spec(path)
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    orchestrator = Orchestrator(loaded, create_or_resume(loaded, url), url, Path("runs/x"))
    assert orchestrator.out_dir == tmp_path / "runs" / "x"


def test_a_bad_second_command_changes_nothing_recorded(tmp_path, capsys, monkeypatch):
    name, path = unsupported_spec(tmp_path, trials=3)
    out = tmp_path / "out"
    url = f"sqlite:///{out / 'study.db'}"
    assert tunelab("run", path, "--out", out).returncode == 0

    def snapshot():
        study = optuna.load_study(study_name=name, storage=url)
        trials = [(t.number, t.state, t.values, t.params, t.user_attrs, t.system_attrs)
                  for t in study.trials]  # fmt: skip
        return study.user_attrs, trials

    before = snapshot()
    changed = tmp_path / "changed.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["space"]["ppo.kl_coef"]["high"] = 0.9  # another search space, same study name
    changed.write_text(yaml.safe_dump(spec, sort_keys=False))
    # Another study into the same folder would overwrite its numbered trial folders.
    another = tmp_path / "another.yaml"
    another.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "name": "another"}))
    assert tunelab("run", another, "--out", tmp_path / "other").returncode == 0
    another_url = f"sqlite:///{tmp_path / 'other' / 'study.db'}"
    monkeypatch.chdir(tmp_path)
    for argv in (
        ["run", another, "--out", out],
        ["worker", "--storage", another_url, "--study", "another", "--out", out],
        ["run", changed, "--out", out],
        ["run", path, "--out", out, "--workers", "0"],
        ["export", out, "--trial", "99"],
        ["report", out, "--out", "/dev/null/x"],
        ["worker", "--storage", url, "--study", name, "--workers", "-2"],
        ["worker", "--storage", url, "--study", "typo", "--out", tmp_path / "w"],
    ):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err  # `run` first says which study and storage it opens
        assert err.count("tunelab: error: ") == 1 and err.splitlines()[-1].startswith("tunelab:")
        if another in argv or "another" in argv:
            assert err == (f"tunelab: error: --out {out}: holds the trials of study {name!r}; "
                           "give study 'another' a folder of its own\n")  # fmt: skip
    assert snapshot() == before
    assert optuna.get_all_study_names(url) == [name]
    assert not (tmp_path / "w" / OWNER_FILE).exists()  # a study that did not open claims none
    assert (out / OWNER_FILE).read_text() == f"{name}\n"


# -- read-only commands ---------------------------------------------------------------------


def test_read_only_commands_never_create_a_storage(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (
        ["report", "--storage", "sqlite:///typo/x.db"],
        ["export", "--storage", f"{tmp_path}/typo.log"],
        ["compare", "--storage", "sqlite:///typo/x.db", "--study", "a", "--study", "b"],
    ):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("tunelab: error: storage ") and err.count("\n") == 1
        assert "no such file (nothing was created)" in err
    assert list(tmp_path.iterdir()) == []
    with fresh_database(POSTGRES) as url:  # a server database without Optuna's tables
        assert main(["report", "--storage", url]) == 2
        assert "holds no Optuna studies" in capsys.readouterr().err
        engine = sqlalchemy.create_engine(url)
        assert sqlalchemy.inspect(engine).get_table_names() == []
        engine.dispose()


def _digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def test_report_and_export_default_to_the_study_folder_not_the_repository(tmp_path, capsys):
    study_dir = tmp_path / "smoke"
    study_dir.mkdir()
    cpu_study("smoke", f"sqlite:///{study_dir / 'study.db'}")
    shipped = {folder: _digest(ROOT / folder) for folder in ("reports/smoke", "exports")}
    cwd = Path.cwd()
    os.chdir(ROOT)  # where a user of the repository runs it
    try:
        assert main(["report", str(study_dir)]) == 0
        assert main(["export", str(study_dir)]) == 0
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert f"report: {study_dir / 'report' / 'index.html'}" in out
    assert (study_dir / "report" / "report.md").is_file()
    exported = [p for p in study_dir.iterdir() if p.name.startswith("export-trial")]
    assert len(exported) == 1 and (exported[0] / "trial.yaml").is_file()
    assert {folder: _digest(ROOT / folder) for folder in shipped} == shipped


# -- output folders -------------------------------------------------------------------------


@contextlib.contextmanager
def mounted(target: Path, *options: str):
    target.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", *options, str(target)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount here (needs root)")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_full_output_folder_is_reported_before_any_trial(tmp_path, capsys):
    with mounted(tmp_path / "full", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as full:
        code = main(["run", str(ROOT / "studies" / "smoke.yaml"), "--out", str(full / "smoke")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"--out {full / 'smoke'}: only 1.0 MiB free, below the 64 MiB" in err
        assert not (full / "smoke" / "study.db").exists()


def test_a_read_only_output_folder_is_reported_before_any_trial(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    with mounted(folder, "--bind", str(folder)):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        code = main(["run", str(ROOT / "studies" / "smoke.yaml"), "--out", str(folder / "s")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"--out {folder / 's'}: cannot write there (Read-only file system)" in err


# -- locks, reachability, secrets -----------------------------------------------------------


def test_the_mysql_lock_is_never_skipped_on_timeout():
    url = f"{MARIADB}/test"
    key = f"tunelab:test-{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as holder:
        assert holder.execute(sqlalchemy.text("SELECT GET_LOCK(:k, 0)"), {"k": key}).scalar()
        entered = []
        started = time.monotonic()
        refused = pytest.raises(StorageFault, match=f"MySQL lock '{key}' not granted within 1 s")
        with refused, storage_lock(url, key, timeout_s=1):
            entered.append(True)
        assert entered == [] and time.monotonic() - started < 10
        holder.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": key})
    engine.dispose()
    with storage_lock(url, "tunelab:" + "a-long-study-name" * 8, timeout_s=1):
        entered.append(True)  # names beyond MySQL's 64 characters are hashed, not refused
    assert entered == [True]


def test_an_unreachable_storage_is_one_line_without_the_password(tmp_path, capsys):
    url = "postgresql://postgres:S3cret-pw@127.0.0.1:1/test"
    code = main(["run", str(ROOT / "studies" / "smoke.yaml"), "--storage", url,
                 "--out", str(tmp_path / "out")])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    assert "S3cret-pw" not in captured.out + captured.err
    assert captured.err.count("tunelab: error: ") == 1 and "Traceback" not in captured.err
    assert captured.err.endswith(")\n")  # the error is one line, the last
    assert captured.err.splitlines()[-1].startswith(
        "tunelab: error: storage postgresql://postgres:***@127.0.0.1:1/test: cannot open ("
    )


def test_a_password_is_never_printed_nor_stored(tmp_path):
    secret = "Pa55-w0rd"  # trust authentication: the server ignores it, so the study runs
    with fresh_database(POSTGRES) as url:
        url = url.replace("postgres@", f"postgres:{secret}@")
        name, path = unsupported_spec(tmp_path, trials=2)
        run = tunelab("run", path, "--storage", url, "--out", tmp_path / "out")
        assert run.returncode == 0, run.stderr[-3000:]
        worker = tunelab("worker", "--storage", url, "--study", name, "--out", tmp_path / "w")
        missing = tunelab("worker", "--storage", url, "--study", "nope", "--out", tmp_path / "x")
        report = tunelab("report", "--storage", url, "--out", tmp_path / "report")
        assert worker.returncode == 0 and missing.returncode == 2 and report.returncode == 0
        for done in (run, worker, missing, report):
            assert secret not in done.stdout + done.stderr
        assert "postgres:***@" in run.stderr and "postgres:***@" in missing.stderr
        study = optuna.load_study(study_name=name, storage=url)
        stored = json.dumps(
            [
                study.user_attrs,
                study._storage.get_study_system_attrs(study._study_id),
                [(t.user_attrs, t.system_attrs) for t in study.trials],
            ]
        )
        assert secret not in stored
        written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".db"]
        assert written and not [p for p in written if secret.encode() in p.read_bytes()]


def test_a_baseline_outside_the_space_runs_with_its_overrides(tmp_path):
    name, path = write_spec(
        tmp_path, budget={"trials": 1}, space={"precision": {"choices": ["bf16", "fp32"]}},
        baselines=[{"name": "fp16", "params": {},  # the hybrid engine keeps it from launching
                    "overrides": {"precision": "fp16", "hybrid_engine": True}}],
    )  # fmt: skip
    run = tunelab("run", path, "--out", tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    trial = by_baseline(
        optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/out/study.db")
    )["fp16"]
    assert trial.params == {}  # never sampled
    assert trial.user_attrs["config"]["precision"] == "fp16"
    assert trial.user_attrs["status"] == "unsupported"


def test_open_storage_without_create_needs_the_file(tmp_path):
    with pytest.raises(Exception, match="no such file"):
        open_storage(f"sqlite:///{tmp_path}/absent/study.db", create=False)
    assert not (tmp_path / "absent").exists()


def test_a_study_stopped_by_its_time_budget_says_so(tmp_path):
    _, path = unsupported_spec(tmp_path, trials=50, name="timed")
    spec = yaml.safe_load(path.read_text())
    spec["budget"]["minutes"] = 0.002  # 0.12 s: over before the 50 trials
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run = tunelab("run", path, "--out", tmp_path / "out")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "[timed] stopped: its 0.002-minute budget is used; the same command continues" in (
        run.stderr
    )
