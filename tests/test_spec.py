"""Study specs: every shipped spec loads; the search space; one-line errors naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from tunelab.errors import InputError
from tunelab.pruning import dominated
from tunelab.spec import Objective, load_spec, trial_config
from tunelab.study import suggest_params

from .conftest import ROOT

SPECS = sorted((ROOT / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_every_shipped_spec_loads_and_starts_with_its_command(path):
    loaded = load_spec(path)
    assert path.read_text().splitlines()[0] == f"# tunelab run studies/{path.name}"
    assert loaded.spec.name == path.stem
    # Each baseline is a valid trial of the space (its overrides are never sampled).
    for baseline in loaded.spec.baselines:
        trial = optuna.trial.FixedTrial(baseline.params)
        params = suggest_params(trial, loaded, baseline.overrides)
        config = trial_config(loaded, params, baseline.overrides)
        assert config.ranks >= 1 and not set(params) & set(baseline.overrides)


def test_shipped_trial_configs_start_with_their_command():
    for path in sorted((ROOT / "studies" / "trials").glob("*.yaml")):
        assert path.read_text().startswith("# tunelab trial studies/trials/"), path.name


def test_conditional_knobs_and_same_as():
    loaded = load_spec(ROOT / "studies" / "smoke.yaml")
    zero0 = suggest_params(
        optuna.trial.FixedTrial({"actor.zero_stage": 0, "precision": "bf16",
                                 "actor.lora_rank": 8, "ppo.kl_coef": 0.05}), loaded,
    )  # fmt: skip
    assert "actor.offload_optimizer" not in zero0  # only with ZeRO 1-3
    config = trial_config(loaded, zero0)
    assert config.critic.zero_stage == 0  # same_as actor.zero_stage
    assert config.actor.offload_optimizer == "none"  # the base config's value
    zero3 = {"actor.zero_stage": 3, "precision": "fp32", "actor.offload_optimizer": "cpu",
             "actor.lora_rank": 0, "ppo.kl_coef": 0.2}  # fmt: skip
    params = suggest_params(optuna.trial.FixedTrial(zero3), loaded)
    config = trial_config(loaded, params)
    assert config.critic.offload_optimizer == "cpu" and config.critic.zero_stage == 3
    assert config.ppo.kl_coef == 0.2


def _write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "trials").mkdir(exist_ok=True)
    (tmp_path / "trials" / "tiny.yaml").write_text((ROOT / "studies/trials/tiny.yaml").read_text())
    path = tmp_path / "spec.yaml"
    path.write_text(
        "name: t\nbase: trials/tiny.yaml\nbudget: {trials: 2}\n"
        "objectives: [{metric: perf/ppo_e2e_tokens_per_s, direction: maximize}]\n" + body
    )
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("space: {actor.zero_stagee: {choices: [0, 1]}}",
         "space.actor.zero_stagee: not a trial config key (did you mean 'actor.zero_stage'?)"),
        ("space: {actor.zero_stage: {choices: [0, two]}}",
         "space.actor.zero_stage.choices[1]: expected int, got 'two'"),
        ("space: {actor.zero_stage: {low: 0}}",
         "space.actor.zero_stage: a range needs low <= high"),
        ("space: {ppo.kl_coef: {choices: [0.1], low: 0.1, high: 0.2}}",
         "give exactly one of choices, low/high, same_as"),
        ("constraints: [{metric: ppo/gold_gainn, min: 0}]",
         "constraints[0].metric: unknown metric 'ppo/gold_gainn' (did you mean 'ppo/gold_gain'?)"),
        ("sampler: {type: annealing}", "sampler.type: expected one of"),
        ("budgett: {trials: 3}", "budgett: unknown key (did you mean 'budget'?)"),
        ("space: {actor.zero_stage: {choices: [0]}}\n"
         "baselines: [{name: b, params: {precision: fp16}}]",
         "baselines[0].params.precision: not a knob of the space"),
        ("space: {critic.zero_stage: {same_as: actor.zero_stage}}",
         "space.critic.zero_stage.same_as: 'actor.zero_stage' is not a knob"),
        ("space: {actor.offload_optimizer: {choices: [none, cpu], when: {actor.zero_stag: [1]}}}",
         "space.actor.offload_optimizer.when: unknown key 'actor.zero_stag'"),
        ("objectives: []", "objectives: give at least one"),
        ("measure: [sft, rm]", "measure: ['sft', 'rm']: must include ppo"),
        ("measure: [ppo, rl]", "measure[1]: expected one of"),
        ("objectives: [{metric: rm/eval_accuracy, direction: maximize}]\nmeasure: [ppo]",
         "objectives[0].metric: rm/eval_accuracy belongs to rm, which "
         "the study does not measure (measure: ['ppo'])"),
        ("confirm: {top_k: 2, repeats: 1}", "confirm.repeats: must be >= 2, got 1"),
        ("confirm: {top_k: -1}", "confirm.top_k: must be >= 0, got -1"),
        ("confirm: {top: 2}", "confirm.top: unknown key (did you mean 'top_k'?)"),
    ],
)  # fmt: skip
def test_malformed_spec_is_one_line_naming_the_key(tmp_path, body, message):
    path = _write(tmp_path, body)
    if body.startswith("objectives"):
        path.write_text(
            path.read_text().replace(
                "objectives: [{metric: perf/ppo_e2e_tokens_per_s, direction: maximize}]\n", ""
            )
        )
    with pytest.raises(InputError) as info:
        load_spec(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_run_command_rejects_malformed_spec_with_exit_2(tmp_path):
    path = _write(tmp_path, "space: {actor.zero_stage: {choices: [0, two]}}")
    run = subprocess.run([sys.executable, "-m", "tunelab", "run", str(path)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1
    assert "space.actor.zero_stage.choices[1]" in run.stderr
    assert not (tmp_path / "runs").exists()


def test_dominance_only_judges_objectives_known_early():
    throughput = Objective("perf/ppo_e2e_tokens_per_s", "maximize")
    memory = Objective("mem/predicted_device_peak_bytes", "minimize")
    gold = Objective("ppo/gold_gain", "maximize")
    finished = [{"perf/ppo_e2e_tokens_per_s": 1000.0, "mem/predicted_device_peak_bytes": 10.0,
                 "ppo/gold_gain": 0.3}]  # fmt: skip
    slow_fat = {"perf/ppo_e2e_tokens_per_s": 500.0, "mem/predicted_device_peak_bytes": 20.0}
    slow_lean = {"perf/ppo_e2e_tokens_per_s": 500.0, "mem/predicted_device_peak_bytes": 5.0}
    close = {"perf/ppo_e2e_tokens_per_s": 900.0, "mem/predicted_device_peak_bytes": 20.0}
    assert dominated(slow_fat, finished, [throughput, memory], margin=0.2)
    assert not dominated(slow_lean, finished, [throughput, memory], 0.2)  # may be on the front
    assert not dominated(close, finished, [throughput, memory], 0.2)  # within noise
    assert not dominated(slow_fat, finished, [throughput, memory, gold], 0.2)  # gold unknown yet
