"""Property-based tests (hypothesis): every generated trial config, study spec, data file and
command line gives a valid object or tunelab's own InputError, never another exception.

A few hundred examples in all, deterministic (derandomized) for CI; benchmarks/fuzz.py runs
the same properties over ten thousand and more (tests/helpers/properties.py holds both).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .helpers.properties import (
    OVERRIDES,
    SMOKE,
    TINY,
    check_cli,
    check_config,
    check_data,
    check_spec,
    command_lines,
    data_files,
    documents,
)
from .report_tests.studies import cpu_study

CI = {"deadline": None, "derandomize": True, "database": None,
      "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}  # fmt: skip


@settings(max_examples=150, **CI)
@given(document=documents(TINY, "config"), overrides=OVERRIDES)
def test_a_trial_config_loads_or_is_input_error(document, overrides):
    with tempfile.TemporaryDirectory() as folder:
        check_config(Path(folder), document, overrides)


@settings(max_examples=120, **CI)
@given(spec=documents(SMOKE, "spec"), base=st.none() | documents(TINY, "config"))
def test_a_study_spec_loads_and_runs_or_is_input_error(spec, base):
    with tempfile.TemporaryDirectory() as folder:
        check_spec(Path(folder), spec, base)


@settings(max_examples=100, **CI)
@given(document=data_files())
def test_a_data_file_loads_or_is_input_error(document):
    with tempfile.TemporaryDirectory() as folder:
        check_data(Path(folder), document)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A study folder as `tunelab run` leaves it, for report/export/compare/worker."""
    folder = tmp_path_factory.mktemp("smoke")
    cpu_study("smoke", f"sqlite:///{folder / 'study.db'}")
    return folder


@settings(max_examples=80, **CI)
@given(data=st.data())
def test_a_command_line_exits_cleanly(study_dir, data):
    with tempfile.TemporaryDirectory() as folder:
        argv = data.draw(command_lines(Path(folder), study_dir), label="argv")
        check_cli(Path(folder), argv)
