"""Trial configuration: loading, overrides, type and consistency checks (pure, no torch)."""

from __future__ import annotations

import json

import pytest

from tunelab.config import TrialConfig, check_inputs, load_config
from tunelab.errors import InputError

from .conftest import TINY


def test_tiny_config_loads_with_deepspeed_chat_ppo_defaults():
    config = load_config(TINY)
    assert config.actor.zero_stage == 2
    assert config.ppo.max_answer_len == 10
    # Unset PPO coefficients keep DeepSpeed-Chat's hard-coded values.
    ppo = config.ppo
    assert (ppo.kl_coef, ppo.reward_clip, ppo.clip_range, ppo.value_clip_range) == (
        0.1,
        5,
        0.2,
        0.2,
    )
    assert (ppo.gamma, ppo.lam) == (1.0, 0.95)
    assert TrialConfig().critic.learning_rate == 5e-6


def test_overrides_are_typed_and_nested():
    config = load_config(
        TINY, ["ppo.kl_coef=0.05", "actor.lora_rank=4", "actor.lora_modules=[q_proj]"]
    )
    assert config.ppo.kl_coef == 0.05
    assert config.actor.lora_rank == 4
    assert config.actor.lora_modules == ("q_proj",)
    assert load_config(None, ["ppo.kl_coef=1e-3"]).ppo.kl_coef == 1e-3  # YAML reads 1e-3 as str


def test_json_round_trip(tmp_path):
    config = load_config(TINY, ["actor.zero_stage=3", "actor.offload_params=cpu"])
    path = tmp_path / "trial.json"
    path.write_text(json.dumps(config.to_dict()))
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ppo.kl_coeff=0.1"], "ppo.kl_coeff: unknown key (did you mean 'kl_coef'?)"),
        (["actor.zero_stage=two"], "actor.zero_stage: expected int, got 'two'"),
        (["precision=fp8"], "precision: expected one of 'fp32' | 'bf16' | 'fp16', got 'fp8'"),
        (["batch.train_global=64"], "batch.train_global: 64 but batch.train_micro x"),
        (
            ["batch.generation_micro=12"],
            "must be a multiple of batch.train_micro = 16",
        ),
        (["actor.offload_params=cpu"], "actor.offload_params: cpu needs zero_stage 3"),
        (["offload_reference=true"], "offload_reference: needs actor.zero_stage 3"),
        (["warmup_steps=40"], "leaves no timed step in sft"),
        (["actor.zero_stage=7"], "actor.zero_stage: must be 0-3, got 7"),
        (["ppo=3"], "ppo: expected a mapping, got 3"),
        (["nonsense"], "expected dotted key=value"),
    ],
)
def test_bad_input_is_one_line_naming_key(overrides, message):
    with pytest.raises(InputError) as info:
        load_config(TINY, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert str(TINY) in text  # names the file


def test_global_batch_counts_ranks():
    config = load_config(TINY, ["ranks=2", "batch.train_micro=8", "batch.train_global=16"])
    assert config.batch.train_global == 16


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\nppo: [unclosed\n")
    with pytest.raises(InputError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(path)


def test_check_inputs_rejects_lengths_beyond_positions():
    config = load_config(TINY, ["ppo.max_prompt_len=200", "ppo.max_answer_len=100"])
    with pytest.raises(InputError, match=r"exceeds the 256 positions of models\.actor"):
        check_inputs(config)


def test_unknown_model_name():
    with pytest.raises(InputError, match="not a preset"):
        check_inputs(load_config(TINY, ["models.actor=opt-9000"]))


def test_a_section_given_in_part_keeps_its_own_defaults(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("actor: {zero_stage: 1}\ncritic: {zero_stage: 1}\nrm: {steps: 5}\n")
    config = load_config(path)
    assert config.actor.dropout == 0.0  # the actor's default (DeepSpeed-Chat's scripts)
    assert config.critic.learning_rate == 5e-6 and config.critic.dropout is None
    assert config.rm.learning_rate == 5e-6 and config.rm.steps == 5


def test_eval_seed_is_fixed_by_default_and_checked():
    assert load_config(TINY).eval_seed == 0  # every trial evaluated on the same draws
    assert load_config(TINY, ["eval_seed=null"]).eval_seed is None  # the trial's own seed
    with pytest.raises(InputError, match=r"eval_seed: must lie in \[0, 2\*\*32\), got -1"):
        load_config(TINY, ["eval_seed=-1"])
