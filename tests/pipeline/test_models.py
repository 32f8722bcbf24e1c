"""LoRA through peft on real DeepSpeed engines: base frozen, adapters trained, merge exact."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from tunelab.config import EngineConfig
from tunelab.dsconfig import train_ds_config
from tunelab.pipeline.models import (
    build_causal_lm,
    build_value_model,
    consolidated_state_dict,
    gathered,
    prepare_for_training,
    train_engine,
    train_tokenizer,
)
from tunelab.presets import resolve_model


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["review of the film : good bad fine"] * 4, vocab_size=128)


def _snapshot(engine, keyword):
    with gathered(engine):
        return {
            name: p.detach().clone()
            for name, p in engine.module.named_parameters()
            if keyword(name)
        }


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("role", ["actor", "critic"])
def test_lora_trains_adapters_only(in_process_trials, tiny_config, tokenizer, stage, role):
    from tunelab.pipeline.runtime import start_runtime

    config = tiny_config()
    runtime = start_runtime(config)
    engine_config = EngineConfig(zero_stage=stage, lora_rank=4, learning_rate=1e-2)
    source = resolve_model("tiny")
    model = (
        build_causal_lm(source, tokenizer)
        if role == "actor"
        else build_value_model(source, tokenizer)
    )
    model = prepare_for_training(model, engine_config)
    assert isinstance(model if role == "actor" else model.backbone, PeftModel)
    engine = train_engine(model, train_ds_config(config, engine_config, 1e-2))
    base = _snapshot(engine, lambda n: "lora_" not in n and "v_head" not in n)
    adapters = _snapshot(engine, lambda n: "lora_B" in n)
    assert adapters and all(torch.count_nonzero(t) == 0 for t in adapters.values())  # peft init
    ids = torch.randint(4, len(tokenizer), (16, 12))
    mask = torch.ones_like(ids)
    for _ in range(3):
        if role == "actor":
            loss = engine(input_ids=ids, attention_mask=mask, labels=ids).loss
        else:
            loss = engine(input_ids=ids, attention_mask=mask).pow(2).mean()
        engine.backward(loss)
        engine.step()
    after_base = _snapshot(engine, lambda n: "lora_" not in n and "v_head" not in n)
    after_adapters = _snapshot(engine, lambda n: "lora_B" in n)
    assert all(torch.equal(base[n], after_base[n]) for n in base)
    assert all(torch.count_nonzero(t) > 0 for t in after_adapters.values())
    assert runtime.world_size == 1
    engine.destroy()


def test_consolidated_weights_merge_lora_into_base_keys(in_process_trials, tiny_config, tokenizer):
    config = tiny_config()
    engine_config = EngineConfig(zero_stage=3, lora_rank=4, learning_rate=1e-2)
    source = resolve_model("tiny")
    engine = train_engine(
        prepare_for_training(build_causal_lm(source, tokenizer), engine_config),
        train_ds_config(config, engine_config, 1e-2),
    )
    ids = torch.randint(4, len(tokenizer), (16, 12))
    loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    engine.backward(loss)
    engine.step()
    merged = consolidated_state_dict(engine)
    plain = build_causal_lm(source, tokenizer)
    assert set(merged) == set(plain.state_dict())  # loads into a fresh model as is
    plain.load_state_dict(merged)
    with gathered(engine), torch.no_grad():
        engine.module.eval()
        expected = engine.module(input_ids=ids).logits.float()
        got = plain.to(torch.bfloat16)(input_ids=ids).logits.float()
    assert torch.allclose(expected, got, atol=0.1)
    engine.destroy()
