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

from tunelab.launcher import launch_trial
from tunelab.pipeline.zygote import (
    PRELOAD,
    PRELOAD_WITHOUT_GPU,
    cuda_driver_mapped,
    file_mappings,
    present_runs,
)
from tunelab.records import Status
from tunelab.zygote import ZygotePool

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


def test_forked_trials_learn_measure_stop_and_die_as_fresh_ones(short_config, tmp_path):
    """One story, as pytest gives each test an environment of its own (PYTEST_CURRENT_TEST)
    and a zygote serves one trial environment."""
    fresh = launch_trial(short_config, tmp_path / "fresh")
    assert fresh.status == Status.OK and "tunelab zygote" not in _log(fresh)
    pool = ZygotePool()
    try:
        forked = [launch_trial(short_config, tmp_path / f"forked{i}", zygotes=pool)
                  for i in range(2)]  # fmt: skip
        for outcome in forked:
            assert outcome.status == Status.OK, _log(outcome)[-2000:]
            for name in LEARNED:  # the same seed and threads: the same numbers
                assert outcome.metrics[name] == pytest.approx(fresh.metrics[name], rel=1e-6)
            # The libraries' pages count as in a fresh process (within 2%).
            peak, fresh_peak = (o.metrics["mem/peak_host_rss_bytes"] for o in (outcome, fresh))
            assert abs(peak - fresh_peak) <= 0.02 * fresh_peak
        zygote = _zygote_pid(forked[0])
        assert _zygote_pid(forked[1]) == zygote  # one zygote served both
        imported = _log(forked[0])
        assert all(module in imported for module in PRELOAD + PRELOAD_WITHOUT_GPU)  # no GPU

        started: list[int] = []
        slow = launch_trial(short_config, tmp_path / "slow", zygotes=pool, timeout_s=1.0,
                            on_start=started.append)  # fmt: skip
        assert slow.status == Status.TIMEOUT
        assert not psutil.pid_exists(started[0])  # its process group is gone, reaped
        assert _zygote_pid(slow) == zygote  # which serves on

        def kill_zygote(pid: int) -> None:
            started.append(pid)
            threading.Timer(0.5, os.kill, (psutil.Process(pid).ppid(), signal.SIGKILL)).start()

        orphan = launch_trial(short_config, tmp_path / "orphan", zygotes=pool,
                              on_start=kill_zygote)  # fmt: skip
        assert orphan.status == Status.KILLED  # SIGKILL from outside, as the zygote's death is
        with contextlib.suppress(psutil.NoSuchProcess):  # a zombie at most (this VM's init)
            assert psutil.Process(started[-1]).status() == psutil.STATUS_ZOMBIE
        after = launch_trial(short_config, tmp_path / "after", zygotes=pool)
        assert after.status == Status.OK
        assert _zygote_pid(after) not in (zygote, psutil.Process().pid)  # a new zygote
    finally:
        pool.close()


def test_a_zygote_with_the_cuda_driver_loaded_starts_each_trial_fresh(
    short_config, tmp_path, monkeypatch
):
    """A library named libcuda.so.1, preloaded by the dynamic loader into the zygote, stands
    in for a CUDA runtime the imports started: the child must not run the trial itself."""
    fake = tmp_path / "libcuda.so.1"
    shutil.copy("/lib/x86_64-linux-gnu/libutil.so.1", fake)
    monkeypatch.setenv("LD_PRELOAD", str(fake))
    pool = ZygotePool()
    try:
        outcome = launch_trial(short_config, tmp_path / "t", zygotes=pool)
    finally:
        pool.close()
    assert outcome.status == Status.OK, _log(outcome)[-2000:]
    log = _log(outcome)
    assert "the CUDA driver is loaded here; starting a fresh process" in log
    assert "tunelab zygote: forked" not in log
