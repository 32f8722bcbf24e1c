"""DeepSpeed config builders: pure dicts, checked by value and by DeepSpeed's own parser."""

from __future__ import annotations

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

from tunelab.dsconfig import engine_ds_configs
from tunelab.records import ENGINES


def test_batch_keys_follow_ranks(tiny_config):
    configs = engine_ds_configs(
        tiny_config("ranks=4", "batch.train_micro=8", "batch.grad_accum=2")
    )
    for role in ENGINES:
        assert configs[role]["train_batch_size"] == 8 * 2 * 4
        assert configs[role]["train_micro_batch_size_per_gpu"] == 8
        assert configs[role]["gradient_accumulation_steps"] == 2


def test_zero3_offload_and_frozen_models_follow_deepspeed_chat(tiny_config):
    config = tiny_config(
        "actor.zero_stage=3", "actor.offload_params=cpu", "actor.offload_optimizer=cpu",
        "critic.zero_stage=1", "offload_reference=true", "precision=fp16",
    )  # fmt: skip
    configs = engine_ds_configs(config)
    actor = configs["actor"]["zero_optimization"]
    assert actor["stage"] == 3
    assert actor["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert actor["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert actor["stage3_param_persistence_threshold"] == 10_000
    # Reference follows the actor's ZeRO-3 and offloads; the reward model drops to stage 0.
    assert configs["reference"]["zero_optimization"]["stage"] == 3
    assert configs["reference"]["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "optimizer" not in configs["reference"]
    assert configs["reward"]["zero_optimization"] == {"stage": 0}
    assert configs["critic"]["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert configs["actor"]["fp16"] == {"enabled": True, "loss_scale_window": 100}
    assert configs["actor"]["optimizer"]["params"]["lr"] == config.actor.learning_rate
    assert configs["sft"]["optimizer"]["params"]["lr"] == config.sft.learning_rate
    assert configs["rm"]["optimizer"]["params"]["betas"] == [0.9, 0.95]


def test_hybrid_engine_block(tiny_config):
    configs = engine_ds_configs(tiny_config("hybrid_engine=true"))
    assert configs["actor"]["hybrid_engine"]["enabled"] is True
    assert configs["actor"]["hybrid_engine"]["max_out_tokens"] == 8 + 10
    assert "hybrid_engine" not in configs["critic"]
    assert "hybrid_engine" not in engine_ds_configs(tiny_config())["actor"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_deepspeed_parses_every_engine_config(tiny_config, stage, precision):
    config = tiny_config(
        f"actor.zero_stage={stage}", f"critic.zero_stage={stage}", f"precision={precision}"
    )
    for role, ds_config in engine_ds_configs(config).items():
        parsed = DeepSpeedConfig(ds_config)  # one rank: no process group here
        assert parsed.zero_optimization_stage == ds_config["zero_optimization"]["stage"], role
        assert parsed.bfloat16_config.enabled == (precision == "bf16")
        assert parsed.float16_config.enabled == (precision == "fp16")
        assert parsed.train_batch_size == ds_config["train_batch_size"]
