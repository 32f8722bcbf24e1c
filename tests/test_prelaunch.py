"""The orchestrator's units: the verdict before launch and the pruning of a running trial."""

from __future__ import annotations

import json

import pytest
from optuna.trial import TrialState

from tunelab.devices import Gpu
from tunelab.memory import trial_prediction
from tunelab.prelaunch import check_trial, over_budget, predicted_memory
from tunelab.presets import PRESETS
from tunelab.pruning import TrialPruning
from tunelab.records import Status
from tunelab.spec import Constraint, Objective, PrunerSpec, load_spec
from tunelab.stagecache import START, stage_plan

from .test_study import write_spec

THROUGHPUT = Objective("perf/ppo_e2e_tokens_per_s", "maximize")
MEMORY = Objective("mem/predicted_device_peak_bytes", "minimize")


def loaded_spec(tmp_path, **fields):
    fields.setdefault("space", {"ppo.kl_coef": {"low": 0.05, "high": 0.2}})
    return load_spec(write_spec(tmp_path, budget={"trials": 2}, **fields)[1])


def test_a_trial_that_can_run_gets_its_plan_and_the_trials_own_prediction(tmp_path):
    loaded = loaded_spec(tmp_path, measure=["ppo"])
    verdict = check_trial(loaded, {"ppo.kl_coef": 0.15}, None, [], tmp_path / "cache")
    assert verdict.refusal is None and verdict.config.ppo.kl_coef == 0.15
    assert verdict.plan == stage_plan(verdict.config, tmp_path / "cache", ("ppo",))
    actions = {stage: step["action"] for stage, step in verdict.plan.items()}
    assert actions == {"sft": "save", "rm": "save", START: "save"}
    tiny = PRESETS["tiny"]
    # On the CPU: no CUDA headroom, as the trial process predicts for itself.
    expected = trial_prediction(verdict.config, tiny, tiny, False).flat_metrics()
    assert verdict.predicted == expected
    assert verdict.predicted["mem/predicted_device_headroom_bytes"] == 0
    assert verdict.predicted["mem/actor/predicted_model_states_bytes"] > 0


def test_parameters_that_make_no_valid_config_are_invalid(tmp_path):
    loaded = loaded_spec(tmp_path, space={"batch.train_micro": {"choices": [4, 16]}})
    verdict = check_trial(loaded, {"batch.train_micro": 0}, None, [], tmp_path)
    assert verdict.config is None and verdict.refusal[0] == Status.INVALID
    assert "batch.train_micro" in verdict.refusal[1]


def test_what_this_node_cannot_run_is_unsupported_with_the_nodes_reason(tmp_path):
    loaded = loaded_spec(tmp_path, base_overrides={"device": "cuda"})
    verdict = check_trial(loaded, {"ppo.kl_coef": 0.1}, None, [], tmp_path)
    assert verdict.refusal == (
        Status.UNSUPPORTED, "device=cuda requested on a node without GPUs (not launched)"
    )
    old = Gpu(index=0, name="Tesla V100", memory_bytes=16 * 2**30, compute_capability=(7, 0))
    verdict = check_trial(loaded_spec(tmp_path / "v100"), {"ppo.kl_coef": 0.1}, None, [old],
                          tmp_path)  # fmt: skip
    assert verdict.refusal[0] == Status.UNSUPPORTED and "bf16" in verdict.refusal[1]
    # A CUDA trial's prediction holds the CUDA context the trial will have.
    assert verdict.predicted["mem/predicted_device_headroom_bytes"] > 0


def test_a_trial_predicted_over_the_memory_budget_is_pruned_with_the_figures(tmp_path):
    loaded = loaded_spec(tmp_path, memory_budget={"device_gib": 0.001})
    verdict = check_trial(loaded, {"ppo.kl_coef": 0.1}, None, [], tmp_path)
    status, reason = verdict.refusal
    assert status == Status.PRUNED_MEMORY and status.optuna_state == "PRUNED"
    peak = verdict.predicted["mem/predicted_device_peak_bytes"] / 2**30
    assert reason == (f"predicted device peak {peak:.2f} GiB per rank exceeds the 0.001 GiB "
                      "budget; not launched")  # fmt: skip
    assert over_budget(None, loaded.spec.memory_budget) is None  # unknown shape: launched


def test_hub_models_have_no_prediction_before_launch(tmp_path, tiny_config):
    config = tiny_config("models.actor=facebook/opt-125m")
    assert predicted_memory(config, False, []) is None


@pytest.mark.parametrize("status", list(Status))
def test_statuses_are_stored_as_their_names_and_map_to_optuna_states(status):
    assert json.loads(json.dumps({"s": status}))["s"] == status.value
    assert TrialState[status.optuna_state].is_finished()
    expected = {"ok": "COMPLETE", "pruned": "PRUNED", "pruned_memory": "PRUNED"}
    assert status.optuna_state == expected.get(status.value, "FAIL")


def pruning(pruner: PrunerSpec, finished=(), optuna_answer=False, constraints=()):
    asked = []

    def optuna_prunes(value, step):
        asked.append((value, step))
        return optuna_answer

    policy = TrialPruning(pruner, [THROUGHPUT, MEMORY], {MEMORY.metric: 2e9}, list(finished),
                          optuna_prunes, constraints)  # fmt: skip
    return policy, asked


def test_a_confirmation_run_never_stops_early():
    """Past a stop line and with a pruner that would stop it, a confirmation run goes on: it
    measures its configuration's noise, which a stop would cut short."""
    kl = Constraint("ppo/kl_final", max=8.0, stop_margin=0.25)
    record = {"stage": "ppo", "step": 4, "ppo/kl_recent": 10.5, THROUGHPUT.metric: 700.0}
    policy, _ = pruning(PrunerSpec(type="median"), optuna_answer=True, constraints=[kl])
    assert policy.should_stop(record)
    confirmation = TrialPruning(PrunerSpec(type="median"), [THROUGHPUT, MEMORY], {}, [],
                                lambda *_: True, [kl], confirmation=True)  # fmt: skip
    assert not confirmation.should_stop(record) and confirmation.stopped_by is None


def test_a_trial_past_a_constraints_stop_line_stops_before_any_pruner_is_asked():
    kl = Constraint("ppo/kl_final", max=8.0, stop_margin=0.25)  # stop line 10
    assert kl.stop_line() == 10.0 and Constraint("ppo/kl_final", max=8.0).stop_line() is None
    policy, asked = pruning(PrunerSpec(type="median"), constraints=[kl])
    assert not policy.should_stop({"stage": "ppo", "step": 3, "ppo/kl_recent": 10.0})
    assert policy.stopped_by is None and asked == []  # no throughput in the record
    assert policy.should_stop({"stage": "ppo", "step": 4, "ppo/kl_recent": 10.5,
                               THROUGHPUT.metric: 700.0})  # fmt: skip
    assert asked == []  # stopped by the constraint; Optuna is not asked
    assert policy.stopped_by == (
        "ppo/kl_recent 10.5 is past the constraint ppo/kl_final <= 8 by more than 25%")
    # Without a stop margin a constraint never stops a trial; the pruner still decides.
    policy, asked = pruning(PrunerSpec(type="median"), optuna_answer=True,
                            constraints=[Constraint("ppo/kl_final", max=8.0)])  # fmt: skip
    assert policy.should_stop({"stage": "ppo", "step": 4, "ppo/kl_recent": 99.0,
                               THROUGHPUT.metric: 700.0})  # fmt: skip
    assert asked == [(700.0, 4)]
    assert policy.stopped_by == "median pruner on perf/ppo_e2e_tokens_per_s"


def test_a_memory_peak_so_far_past_its_bound_stops_the_trial():
    """Peaks only grow, so stop_margin 0 stops exactly the trials whose final peak is past max."""
    host = Constraint("mem/peak_host_rss_bytes", max=2e9, stop_margin=0.0)
    policy, asked = pruning(PrunerSpec(type="none"), constraints=[host])
    assert not policy.should_stop({"stage": "ppo", "step": 0,
                                   "mem/peak_host_rss_so_far_bytes": 2e9})  # fmt: skip
    assert policy.should_stop({"stage": "ppo", "step": 1, "mem/peak_host_rss_so_far_bytes": 2.5e9})
    assert policy.stopped_by == ("mem/peak_host_rss_so_far_bytes 2.5e+09 is past the constraint "
                                 "mem/peak_host_rss_bytes <= 2e+09 by more than 0%")  # fmt: skip
    # A CPU trial reports no device peaks: a device bound never stops it.
    device = Constraint("mem/peak_device_allocated_bytes", max=1.0, stop_margin=0.0)
    policy, _ = pruning(PrunerSpec(type="none"), constraints=[device])
    assert not policy.should_stop({"stage": "ppo", "step": 1,
                                   "mem/peak_host_rss_so_far_bytes": 9e9})  # fmt: skip
    assert asked == []


def test_dominance_stops_a_trial_only_when_beaten_on_every_objective():
    beaten_by = {THROUGHPUT.metric: 1000.0, MEMORY.metric: 1e9}
    policy, asked = pruning(PrunerSpec(type="dominance"), [beaten_by])
    assert not policy.should_stop({"stage": "ppo", "step": 1})  # no value yet
    assert not policy.should_stop({"stage": "ppo", "step": 2, THROUGHPUT.metric: 900.0})
    assert policy.should_stop({"stage": "ppo", "step": 3, THROUGHPUT.metric: 500.0})
    assert policy.intermediate == {"2": 900.0, "3": 500.0} and asked == []


def test_optunas_pruners_get_each_value_and_decide():
    policy, asked = pruning(PrunerSpec(type="median"), optuna_answer=True)
    assert policy.should_stop({"stage": "ppo", "step": 4, THROUGHPUT.metric: 700.0})
    assert asked == [(700.0, 4)]
    none, asked = pruning(PrunerSpec(type="none"), optuna_answer=True)
    assert not none.should_stop({"stage": "ppo", "step": 4, THROUGHPUT.metric: 700.0})
    assert asked == [] and none.intermediate == {}
