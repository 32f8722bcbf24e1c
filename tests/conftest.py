"""Shared fixtures: the tiny trial configuration, output folders, a quiet DeepSpeed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One thread per process: the suite runs trials beside pytest's own process (and CI machines
# are shared), and OpenMP's spinning threads slow each other several-fold when cores are
# oversubscribed (tunelab.launcher.cpu_threads). Set before torch is first imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionstart(session):
    """A build lock left by an earlier run's killed process would hold every test that loads
    that DeepSpeed op until the suite's timeout (tunelab.ops)."""
    from tunelab.ops import clear_stale_locks

    for lock in clear_stale_locks()[0]:
        print(f"removed a stale op build lock: {lock}")
TINY = ROOT / "studies" / "trials" / "tiny.yaml"


@pytest.fixture
def tiny_config():
    """The shipped tiny trial config with dotted overrides applied."""
    from tunelab.config import load_config

    def make(*overrides: str):
        return load_config(TINY, overrides)

    return make


@pytest.fixture(scope="session")
def in_process_trials():
    """run_trial in this pytest process (one rank), libraries quietened once."""
    from tunelab.pipeline.run import _quiet_libraries, run_trial

    _quiet_libraries()
    return run_trial


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """check(index.html, screenshot.png) -> PageCheck, in one headless Chromium per session."""
    from tests.browser import open_chromium

    yield from open_chromium(tmp_path_factory)
