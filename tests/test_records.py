"""What a study stores, on real Optuna storages: metric names and one user attr per metric."""

from __future__ import annotations

import json
from wsgiref.util import setup_testing_defaults

import pytest
from optuna.trial import TrialState

from tunelab.launcher import TrialOutcome
from tunelab.metrics import PATTERNS
from tunelab.records import TrialAttr, from_frozen_trial, is_metric_key, trial_metrics
from tunelab.spec import load_spec
from tunelab.storage import default_url
from tunelab.study import create_or_resume, outcome_record, record_outcome

from .test_study import write_spec

MEASURED = {
    "perf/ppo_e2e_tokens_per_s": 5123.5,
    "mem/peak_host_rss_bytes": 612_000_000,
    "ppo/gold_gain": 0.21,
    "mem/actor/measured_model_states_bytes": 2_390_016,
    "gpu/nvml_status": "off: no GPU",
}
OBJECTIVES = [
    {"metric": "perf/ppo_e2e_tokens_per_s", "direction": "maximize"},
    {"metric": "ppo/gold_gain", "direction": "maximize"},
]


def test_every_metric_name_is_namespaced():
    # A key holding "/" is a metric; TrialAttr names never hold one.
    assert all("/" in pattern.pattern for pattern in PATTERNS)
    names = [v for k, v in vars(TrialAttr).items() if not k.startswith("_")]
    assert names and not any(is_metric_key(name) for name in names)


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_metrics_are_flat_user_attrs_and_objectives_are_named(tmp_path, storage):
    _, path = write_spec(tmp_path, objectives=OBJECTIVES, budget={"trials": 1})
    loaded = load_spec(path)
    url = default_url(tmp_path) if storage == "sqlite" else str(tmp_path / "study.log")
    study = create_or_resume(loaded, url)
    assert study.metric_names == [o["metric"] for o in OBJECTIVES]

    trial = study.ask()
    outcome = TrialOutcome("ok", "", MEASURED, {"ppo/kl": [0.0, 0.1]}, 9.5, 0, tmp_path / "t0")
    record_outcome(study, trial, outcome_record(loaded.spec, "ok", "", outcome=outcome))

    frozen = study.trials[0]
    assert frozen.state == TrialState.COMPLETE
    assert frozen.values == [5123.5, 0.21]
    for name, value in MEASURED.items():
        assert frozen.user_attrs[name] == value  # one attr per metric, under its own name
    assert "metrics" not in frozen.user_attrs
    assert trial_metrics(frozen.user_attrs) == MEASURED
    assert from_frozen_trial(frozen).metrics == MEASURED
    assert frozen.user_attrs[TrialAttr.SERIES] == {"ppo/kl": [0.0, 0.1]}
    # Optuna's own tools see each metric as a column, objectives by name.
    frame = study.trials_dataframe(multi_index=True)
    assert frame[("user_attrs", "ppo/gold_gain")].tolist() == [0.21]
    assert frame[("values", "perf/ppo_e2e_tokens_per_s")].tolist() == [5123.5]


def test_optuna_dashboard_names_the_objectives_and_can_plot_every_numeric_metric(tmp_path):
    """optuna-dashboard's own API (its WSGI app, as `optuna-dashboard URL` serves it): the
    objectives by name, and each numeric metric a `sortable` user attr, which its history and
    slice plots offer as a target beside the objectives."""
    import optuna_dashboard

    _, path = write_spec(tmp_path, objectives=OBJECTIVES, budget={"trials": 1})
    loaded = load_spec(path)
    study = create_or_resume(loaded, default_url(tmp_path))
    trial = study.ask()
    outcome = TrialOutcome("ok", "", MEASURED, {}, 9.5, 0, tmp_path / "t0")
    record_outcome(study, trial, outcome_record(loaded.spec, "ok", "", outcome=outcome))

    app = optuna_dashboard.wsgi(default_url(tmp_path))
    environ = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = f"/api/studies/{study._study_id}"
    replies = []
    body = b"".join(app(environ, lambda status, headers, *exc: replies.append(status)))
    assert replies == ["200 OK"]
    served = json.loads(body)
    assert served["objective_names"] == [o["metric"] for o in OBJECTIVES]
    plottable = {a["key"] for a in served["union_user_attrs"] if a["sortable"]}
    numeric = {name for name, value in MEASURED.items() if isinstance(value, int | float)}
    assert numeric <= plottable and "gpu/nvml_status" not in plottable


def test_studies_recorded_with_nested_metrics_are_still_read():
    attrs = {TrialAttr.STATUS: "ok", "metrics": {"ppo/gold_gain": 0.3}}
    assert trial_metrics(attrs) == {"ppo/gold_gain": 0.3}
