"""One-rank trials forked from a zygote (tunelab.zygote, tunelab.pipeline.zygote): they learn
and measure what a fresh trial process does, stop and die like one, and fall back to one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import psutil
import pytest

from tunelab.launcher import launch_trial, trial_env
from tunelab.pipeline.zygote import (
    PRELOAD,
    PRELOAD_WITHOUT_GPU,
    cuda_driver_mapped,
    file_mappings,
    present_runs,
)
from tunelab.records import Status
from tunelab.zygote import Zygote, ZygotePool, ZygoteUnavailable

from .conftest import ROOT

PAGE = os.sysconf("SC_PAGE_SIZE")
SHORT = ("sft.steps=3", "rm.steps=3", "ppo.steps=3", "warmup_steps=1", "data.train_size=256",
         "data.eval_size=32")  # fmt: skip
LEARNED = ("sft/loss_final", "rm/eval_accuracy", "ppo/gold_end", "ppo/kl_final")
MAPS = """\
55d0c0000000-55d0c0001000 r--p 00000000 08:01 1234   /usr/bin/python3.11
55d0c0001000-55d0c0003000 r-xp 00001000 08:01 1234   /usr/bin/python3.11
55d0c1000000-55d0c2000000 rw-p 00000000 00:00 0      [heap]
7f0000000000-7f0000004000 ---p 00000000 08:01 99     /usr/lib/libtorch_cpu.so
7f0000004000-7f0000008000 r-xp 00004000 08:01 99     /usr/lib/libtorch_cpu.so
7f1000000000-7f1000001000 rw-s 00000000 00:05 7      /dev/shm/x
7f2000000000-7f2000002000 rw-p 00000000 00:00 0
7ffd00000000-7ffd00001000 r-xp 00000000 00:00 0      [vdso]
"""


def test_maps_and_pagemap_helpers():
    assert not cuda_driver_mapped(MAPS)
    driver = "7f3000000000-7f3000001000 r-xp 0 08:01 5 /usr/lib64/libcuda.so.550.54.15\n"
    assert cuda_driver_mapped(MAPS + driver)
    assert file_mappings(MAPS) == [
        (0x55D0C0000000, 0x55D0C0001000), (0x55D0C0001000, 0x55D0C0003000),
        (0x7F0000004000, 0x7F0000008000),
    ]  # fmt: skip  # not the heap, anonymous memory, devices, pseudo-files or PROT_NONE
    present = 1 << 63
    entries = [present, present, 0, present, 0, 0, present | 5]
    raw = b"".join(e.to_bytes(8, "little") for e in entries)
    assert present_runs(0x1000, raw) == [(0x1000, 2), (0x1000 + 3 * PAGE, 1),
                                         (0x1000 + 6 * PAGE, 1)]  # fmt: skip


# Forks after importing torch as the zygote does; prints the child's file-backed resident
# kB before and after touch_pages, and the parent's.
FORK_RSS = """
import json, os, sys
import torch
from tunelab.pipeline.zygote import resident_file_runs, touch_pages
def rss_file():
    return int(open('/proc/self/status').read().split('RssFile:')[1].split()[0])
runs = resident_file_runs()
parent = rss_file()
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    before = rss_file()
    touch_pages(runs)
    os.write(write, json.dumps([before, rss_file()]).encode())
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps([parent, *json.loads(os.read(read, 1000))]))
"""


def test_a_forked_child_counts_the_library_pages_its_parent_has_resident():
    run = subprocess.run([sys.executable, "-c", FORK_RSS], capture_output=True, text=True,
                         cwd=ROOT, check=True)  # fmt: skip
    parent, before, after = json.loads(run.stdout.splitlines()[-1])
    assert parent > 50_000  # kB: torch's libraries
    assert before < 0.5 * parent  # what a fork alone would report
    assert 0.97 * parent <= after <= 1.03 * parent


def _log(outcome) -> str:
    return outcome.log_path.read_text()


def _zygote_pid(outcome) -> int:
    line = next(x for x in _log(outcome).splitlines() if "tunelab zygote: forked" in x)
    return int(line.split("forked from pid ")[1].split(",")[0])


@pytest.fixture(scope="module")
def short_config():
    from tunelab.config import load_config

    from .conftest import TINY

    return load_config(TINY, SHORT)


def _zygotes_running() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "tunelab.pipeline.zygote" in child.cmdline():
                found.append(child)
    return found


def test_forked_trials_learn_measure_stop_and_die_as_fresh_ones(short_config, tmp_path):
    """One story, as pytest gives each test an environment of its own (PYTEST_CURRENT_TEST)
    and a zygote serves one trial environment."""
    fresh = launch_trial(short_config, tmp_path / "fresh")
    assert fresh.status == Status.OK and fresh.metrics["trial/forked"] == 0
    pool = ZygotePool(tmp_path / "zygotes.log")
    try:
        forked = [launch_trial(short_config, tmp_path / f"forked{i}", zygotes=pool)
                  for i in range(2)]  # fmt: skip
        for outcome in forked:
            assert outcome.status == Status.OK, _log(outcome)[-2000:]
            assert outcome.metrics["trial/forked"] == 1
            for name in LEARNED:  # the same seed and threads: the same numbers
                assert outcome.metrics[name] == pytest.approx(fresh.metrics[name], rel=1e-6)
            # The libraries' pages count as in a fresh process (within 2%).
            peak, fresh_peak = (o.metrics["mem/peak_host_rss_bytes"] for o in (outcome, fresh))
            assert abs(peak - fresh_peak) <= 0.02 * fresh_peak
        zygote = _zygote_pid(forked[0])
        assert _zygote_pid(forked[1]) == zygote  # one zygote served both
        imported = _log(forked[0])
        assert all(module in imported for module in PRELOAD + PRELOAD_WITHOUT_GPU)  # no GPU
        # The zygote froze its imports' objects: a child's collections leave them alone.
        frozen = int(imported.split(" objects frozen")[0].rsplit(" ", 1)[1])
        assert frozen > 100_000

        groups: list[tuple[int, int, int]] = []  # (pid, its session, its parent)

        def remember(pid: int) -> None:
            groups.append((pid, os.getsid(pid), psutil.Process(pid).ppid()))

        slow = launch_trial(short_config, tmp_path / "slow", zygotes=pool, timeout_s=1.0,
                            on_start=remember)  # fmt: skip
        assert slow.status == Status.TIMEOUT and slow.returncode == -signal.SIGTERM
        pid, session, parent = groups[-1]
        assert session == pid and parent == zygote  # its own session, forked by the zygote
        assert not psutil.pid_exists(pid)  # gone and reaped

        def kill_zygote(pid: int) -> None:
            remember(pid)
            threading.Timer(0.5, os.kill, (groups[-1][2], signal.SIGKILL)).start()

        orphan = launch_trial(short_config, tmp_path / "orphan", zygotes=pool,
                              on_start=kill_zygote)  # fmt: skip
        assert orphan.status == Status.KILLED  # SIGKILL from outside, as the zygote's death is
        assert groups[-1][2] == zygote
        with contextlib.suppress(psutil.NoSuchProcess):  # a zombie at most (this VM's init)
            assert psutil.Process(groups[-1][0]).status() == psutil.STATUS_ZOMBIE
        after = launch_trial(short_config, tmp_path / "after", zygotes=pool)
        assert after.status == Status.OK and after.metrics["trial/forked"] == 1
        assert _zygote_pid(after) != zygote  # a new zygote
        assert len(_zygotes_running()) == 1
    finally:
        pool.close()
    assert not _zygotes_running()


def test_a_stop_while_the_zygote_imports_starts_no_trial(short_config, tmp_path):
    """A study stopped while its first zygote still imports: the trial is interrupted without
    a process of its own (before, a fresh one was started and killed at once)."""
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()  # the zygote's imports take seconds
    started: list[int] = []
    pool = ZygotePool()
    try:
        outcome = launch_trial(short_config, tmp_path / "t", zygotes=pool, stop=stop,
                               on_start=started.append)  # fmt: skip
    finally:
        pool.close()
    assert outcome.status == Status.INTERRUPTED and outcome.returncode is None
    assert started == []
    assert _log(outcome).endswith("tunelab: stopped before the trial started\n")
    assert not _zygotes_running()


def test_a_zygote_whose_imports_load_the_cuda_driver_serves_no_trial(
    short_config, tmp_path, monkeypatch
):
    """A library named libcuda.so.1, preloaded by the dynamic loader into the zygote, stands
    in for a CUDA driver its imports loaded: its trials start fresh, and the next one of that
    environment does not try again."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a stand-in libcuda.so.1")
    (tmp_path / "empty.c").write_text("int tunelab_stand_in;\n")
    fake = tmp_path / "libcuda.so.1"
    subprocess.run([compiler, "-shared", "-o", fake, tmp_path / "empty.c"], check=True)
    monkeypatch.setenv("LD_PRELOAD", str(fake))
    pool = ZygotePool()
    try:
        outcome = launch_trial(short_config, tmp_path / "t", zygotes=pool)
        assert outcome.status == Status.OK, _log(outcome)[-2000:]
        assert outcome.metrics["trial/forked"] == 0
        reason = "the imports loaded the CUDA driver, so a forked child could not use CUDA"
        assert f"tunelab: no zygote ({reason}); a fresh process runs the trial" in _log(outcome)
        assert not _zygotes_running()
        with pytest.raises(ZygoteUnavailable, match="loaded the CUDA driver"):
            pool.start(["--config", "x"], trial_env(ranks=1), tmp_path / "x.log")
        assert not _zygotes_running()  # none started for it
    finally:
        pool.close()


def test_a_zygote_that_fails_to_import_leaves_its_trial_to_a_fresh_process(
    short_config, tmp_path, monkeypatch
):
    """A zygote whose imports fail (a torch that cannot load, first on its path only) ends
    while importing: its trial runs in a fresh process whose log says why and where the
    zygote's output is, and the next trial of that environment does not try again."""
    broken = tmp_path / "broken" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('a torch that cannot load')\n")
    start_zygote = Zygote.__init__

    def with_broken_torch(self, env, log):
        path = os.pathsep.join(filter(None, [str(broken.parent), env.get("PYTHONPATH")]))
        start_zygote(self, {**env, "PYTHONPATH": path}, log)

    monkeypatch.setattr(Zygote, "__init__", with_broken_torch)
    zygotes_log = tmp_path / "zygotes.log"
    pool = ZygotePool(log=zygotes_log)
    try:
        outcome = launch_trial(short_config, tmp_path / "t", zygotes=pool)
        assert outcome.status == Status.OK, _log(outcome)[-2000:]
        assert outcome.metrics["trial/forked"] == 0
        reason = f"it ended while importing (its output: {zygotes_log})"
        assert f"tunelab: no zygote ({reason}); a fresh process runs the trial" in _log(outcome)
        assert "ImportError: a torch that cannot load" in zygotes_log.read_text()
        with pytest.raises(ZygoteUnavailable, match="ended while importing"):
            pool.start(["--config", "x"], trial_env(ranks=1), tmp_path / "x.log")
        assert not _zygotes_running()
    finally:
        pool.close()
