"""Shared fixtures: the tiny trial configuration, output folders, a quiet DeepSpeed."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
