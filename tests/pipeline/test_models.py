"""LoRA through peft on real DeepSpeed engines: base frozen, adapters trained, merge exact."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from tunelab.config import EngineConfig
from tunelab.dsconfig import eval_ds_config, train_ds_config
from tunelab.errors import TrialFailure
from tunelab.pipeline.models import (
    build_causal_lm,
    build_value_model,
    consolidated_state_dict,
    frozen_engine,
    gathered,
    load_weights,
    math_attention,
    optimizer_groups,
    prepare_for_training,
    train_engine,
    train_tokenizer,
    training_attention,
)
from tunelab.presets import resolve_model


@pytest.fixture(scope="module")
def runtime(in_process_trials):
    """This process as a group of one (DeepSpeed's zero.Init needs a process group)."""
    from tunelab.config import load_config
    from tunelab.pipeline.runtime import start_runtime

    from ..conftest import TINY

    return start_runtime(load_config(TINY))


@pytest.fixture(scope="module")
def tokenizer(runtime):
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
def test_lora_trains_adapters_only(runtime, tiny_config, tokenizer, stage, role):
    config = tiny_config()
    engine_config = EngineConfig(zero_stage=stage, lora_rank=4, learning_rate=1e-2)
    ds_config = train_ds_config(config, engine_config, 1e-2)
    source = resolve_model("tiny")
    build = build_causal_lm if role == "actor" else build_value_model
    model = prepare_for_training(build(source, tokenizer, ds_config), engine_config)
    assert isinstance(model if role == "actor" else model.backbone, PeftModel)
    engine = train_engine(model, ds_config, engine_config)
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


def _graph_nodes(loss: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind `loss`."""
    names, todo, seen = set(), [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [next_node for next_node, _ in node.next_functions]
    return names


def test_math_attention_only_for_short_bf16_rows_on_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert math_attention(cpu, torch.bfloat16, 128)
    assert not math_attention(cpu, torch.bfloat16, 129)
    assert not math_attention(cpu, torch.float32, 16)
    assert not math_attention(cuda, torch.bfloat16, 16)


@pytest.mark.parametrize(("precision", "tokens", "kernel"),
                         [("bf16", 18, "math"), ("bf16", 129, "flash"), ("fp32", 18, "flash")])
def test_training_attention_sets_the_kernel_backward_runs(runtime, tiny_config, tokenizer,
                                                          precision, tokens, kernel):
    """The backward of a forward under training_attention is the chosen kernel's: torch's CPU
    flash attention is one autograd node, the math kernel a softmax between matmuls. With
    gradient checkpointing, backward recomputes the forward under the same kernel (another one
    would give tensors of other shapes, which torch refuses)."""
    config = tiny_config(f"precision={precision}")
    engine_config = EngineConfig(zero_stage=0, learning_rate=1e-3, gradient_checkpointing=True)
    ds_config = train_ds_config(config, engine_config, 1e-3)
    model = build_causal_lm(resolve_model("tiny"), tokenizer, ds_config)
    engine = train_engine(prepare_for_training(model, engine_config), ds_config, engine_config)
    ids = torch.randint(4, len(tokenizer), (2, tokens))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: transformers passes the mask to the kernel
    with training_attention(engine, tokens):
        loss = engine(input_ids=ids, attention_mask=mask, labels=ids).loss
        nodes = _graph_nodes(loss)
        engine.backward(loss)
    flash = {name for name in nodes if "FlashAttention" in name}
    assert bool(flash) == (kernel == "flash"), nodes
    softmax = {name for name in nodes if "Softmax" in name and "LogSoftmax" not in name}
    assert bool(softmax) == (kernel == "math"), nodes
    assert torch.isfinite(loss)
    engine.destroy()


def test_consolidated_weights_merge_lora_into_base_keys(tiny_config, tokenizer):
    config = tiny_config()
    engine_config = EngineConfig(zero_stage=3, lora_rank=4, learning_rate=1e-2)
    ds_config = train_ds_config(config, engine_config, 1e-2)
    source = resolve_model("tiny")
    engine = train_engine(
        prepare_for_training(build_causal_lm(source, tokenizer, ds_config), engine_config),
        ds_config,
        engine_config,
    )
    ids = torch.randint(4, len(tokenizer), (16, 12))
    loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    engine.backward(loss)
    engine.step()
    merged = consolidated_state_dict(engine)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())  # the engine's dtype
    # A fresh model built for the next engine (ZeRO-3: partitioned) loads them as they are.
    frozen_config = eval_ds_config(config, zero_stage=3, offload=False)
    fresh = build_causal_lm(source, tokenizer, frozen_config)
    load_weights(fresh, merged, "test")
    frozen = frozen_engine(fresh, frozen_config)
    with torch.no_grad():
        engine.module.eval()
        expected = engine(input_ids=ids).logits.float()
        got = frozen(input_ids=ids).logits.float()
    assert torch.allclose(expected, got, atol=0.1)
    engine.destroy()
    frozen.destroy()


def test_loading_mismatched_weights_names_the_keys(tiny_config, tokenizer):
    ds_config = eval_ds_config(tiny_config(), zero_stage=3, offload=False)
    model = build_causal_lm(resolve_model("tiny"), tokenizer, ds_config)
    state = consolidated_state_dict(frozen_engine(model, ds_config))
    state["v_head.weight"] = state.pop("lm_head.weight")
    with pytest.raises(
        TrialFailure,
        match=r"missing 1 tensors \(lm_head.weight\); unexpected 1"
        r" tensors \(v_head.weight\)",
    ):
        load_weights(build_causal_lm(resolve_model("tiny"), tokenizer, ds_config), state, "x")


def test_lora_scale_and_learning_rate_follow_deepspeed_chat(tiny_config, tokenizer):
    engine_config = EngineConfig(lora_rank=8, lora_scaling=1.0, lora_learning_rate=5e-4)
    ds_config = train_ds_config(tiny_config(), engine_config, 1e-5)
    model = prepare_for_training(
        build_value_model(resolve_model("tiny"), tokenizer, ds_config), engine_config
    )
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    assert layer.scaling["default"] == 1.0 / 8  # DeepSpeed-Chat: lora_scaling / lora_dim
    groups = optimizer_groups(model, engine_config)
    adapters = next(g for g in groups if "lr" in g)
    assert adapters["lr"] == 5e-4 and len(adapters["params"]) == 2 * 6 * 2  # A, B x 6 x 2 layers
    head = next(g for g in groups if "lr" not in g)
    assert [p.shape[0] for p in head["params"]] == [1]  # the value head, at the config's rate


def test_dropout_knob_sets_the_model_config(tiny_config, tokenizer):
    ds_config = train_ds_config(tiny_config(), EngineConfig(), 1e-5)
    kept = build_causal_lm(resolve_model("tiny"), tokenizer, ds_config)
    zeroed = build_causal_lm(resolve_model("tiny"), tokenizer, ds_config, dropout=0.0)
    assert kept.config.dropout == 0.1 and zeroed.config.dropout == 0.0


def test_optimizer_offload_at_zero0_runs_cpu_adam_as_dschat(runtime, tiny_config, tokenizer):
    """DeepSpeed-Chat's --offload at ZeRO-0: DeepSpeed builds DeepSpeedCPUAdam, which the CPU
    accelerator runs (GPUs refuse it before launch: tests/test_devices.py)."""
    engine_config = EngineConfig(zero_stage=0, offload_optimizer="cpu", learning_rate=1e-2)
    ds_config = train_ds_config(tiny_config(), engine_config, 1e-2)
    assert ds_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    model = build_causal_lm(resolve_model("tiny"), tokenizer, ds_config)
    engine = train_engine(prepare_for_training(model, engine_config), ds_config, engine_config)
    assert type(engine.basic_optimizer).__name__ == "DeepSpeedCPUAdam"
    before = next(engine.module.parameters()).detach().clone()
    ids = torch.randint(4, len(tokenizer), (16, 12))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    assert not torch.equal(before, next(engine.module.parameters()))
    engine.destroy()


def test_the_tokenizer_of_a_preset_is_the_same_in_every_process():
    """Token ids must mean the same words in every trial (and in a cached stage's weights);
    tokenizers' WordPieceTrainer broke ties by a per-process hash order."""
    import subprocess
    import sys

    code = (
        "import json; from tunelab.data import synthetic_preferences as s; "
        "from tunelab.pipeline.models import tokenizer_vocabulary as v; "
        "t = [x for e in s(500, 3) for x in (e.prompt, e.chosen, e.rejected)]; "
        "print(json.dumps(v(t, 512)))"
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            for _ in range(2)]  # fmt: skip
    vocabularies = [run.stdout.strip().splitlines()[-1] for run in runs]
    assert vocabularies[0] == vocabularies[1]
