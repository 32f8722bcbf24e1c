"""The pure memory model: hand-computed cases, DeepSpeed's own estimators, stage peaks."""

from __future__ import annotations

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from tunelab.config import EngineConfig, load_config
from tunelab.memory import (
    PERSISTENCE_THRESHOLD,
    activation_bytes,
    engine_states,
    engine_tensors,
    kv_cache_bytes,
    predict,
)
from tunelab.presets import PRESETS

OPT13 = PRESETS["opt-1.3b"]
P13 = 1_315_758_080


def _actor(zero_stage, ranks, **engine):
    trainable, frozen = engine_tensors(OPT13, EngineConfig(zero_stage=zero_stage, **engine), False)
    offload = engine.get("offload_optimizer") == "cpu"
    return engine_states(
        trainable, frozen, zero_stage=zero_stage, ranks=ranks, precision="bf16",
        offload_optimizer=offload, offload_params=engine.get("offload_params") == "cpu",
    )  # fmt: skip


def test_zero2_by_hand_opt13b_on_8_ranks():
    states = _actor(2, 8)
    assert states.params.device == 2 * P13  # 16-bit weights, whole
    assert states.grads.device == 2 * P13 // 8  # this rank's 16-bit gradient partition
    assert states.optimizer.device == 12 * P13 // 8  # fp32 master + momentum + variance
    assert states.step_transient.device == 4 * P13 // 8  # fp32 gradient inside step()
    assert states.model_states.total == 2 * P13 + 14 * P13 // 8 == 4_934_092_800


def test_zero2_matches_deepspeed_estimator():
    for ranks in (1, 8, 64):
        _, gpu = estimate_zero2_model_states_mem_needs(P13, ranks, 1, cpu_offload=False)
        states = _actor(2, ranks)
        assert states.model_states.device + states.step_transient.device == pytest.approx(
            gpu, abs=8
        )
        cpu, gpu = estimate_zero2_model_states_mem_needs(P13, ranks, 1, cpu_offload=True)
        offloaded = _actor(2, ranks, offload_optimizer="cpu")
        assert offloaded.model_states.device == gpu  # 2P: only the 16-bit weights stay
        # DeepSpeed's host figure is for the node (ranks x ours) with a 1.5 buffer factor.
        if ranks <= 4:
            assert offloaded.model_states.host * ranks * 1.5 == pytest.approx(cpu, rel=1e-6)


def test_zero3_matches_deepspeed_estimator_up_to_its_terms():
    ranks = 8
    largest = max(OPT13.param_tensors())
    _, gpu, _ = estimate_zero3_model_states_mem_needs(P13, largest, ranks, 1, cpu_offload=False,
                                                   cpu_offload_params=False)  # fmt: skip
    states = _actor(3, ranks)
    persistent = 2 * sum(t for t in OPT13.param_tensors() if t <= PERSISTENCE_THRESHOLD)
    # DeepSpeed: 4 x largest layer + 18P/N, 18 = 2 params + 4 fp32 grads + 12 optimizer; it
    # leaves out the 16-bit gradient partition (2P/N) and persistent whole tensors we count.
    ours = states.model_states.device + states.step_transient.device
    assert ours - 2 * P13 // ranks - persistent == pytest.approx(gpu - 4 * largest, abs=16)


def test_lora_shrinks_trainable_states():
    full = _actor(2, 1)
    lora = _actor(2, 1, lora_rank=8)
    trainable, frozen = engine_tensors(OPT13, EngineConfig(lora_rank=8), False)
    # all-linear wraps q, k, v, out, fc1, fc2 of each of 24 layers: r * (in + out) each.
    per_layer = 8 * (4 * (2048 + 2048) + (2048 + 8192) + (8192 + 2048))
    assert sum(trainable) == 24 * per_layer
    assert sum(frozen) == P13
    assert lora.optimizer.device == 12 * sum(trainable)
    assert lora.optimizer.device < full.optimizer.device / 100


def test_activations_and_kv_cache_formulas():
    shape = PRESETS["opt-350m"]  # h 1024, 16 heads, 24 layers
    s, b, h, a = 512, 4, 1024, 16
    eager = s * b * h * (34 + 5 * a * s / h)  # Korthikanti et al. eq. 2
    assert activation_bytes(shape, b, s, False, "bf16", eager_attention=True) == 24 * eager
    fused = 34 * s * b * h  # SDPA keeps no score matrices
    assert activation_bytes(shape, b, s, False, "bf16") == 24 * fused
    assert activation_bytes(shape, b, s, True, "bf16") == 2 * s * b * h * 24 + fused
    assert activation_bytes(shape, b, s, False, "fp32") == 2 * 24 * fused
    assert kv_cache_bytes(shape, 8, 512, "bf16") == 2 * 24 * 8 * 512 * 1024 * 2


def test_stage_peaks_order_and_offload():
    config = load_config(None, ["ppo.max_prompt_len=256", "ppo.max_answer_len=256"])
    plain = predict(config, PRESETS["opt-1.3b"], PRESETS["opt-350m"])
    offloaded = predict(
        config.replace(actor=EngineConfig(zero_stage=2, offload_optimizer="cpu")),
        PRESETS["opt-1.3b"], PRESETS["opt-350m"],
    )  # fmt: skip
    assert set(plain.stages) == {"sft", "rm", "ppo_generate", "ppo_experience", "ppo_train"}
    # PPO holds four models, so its peaks exceed the supervised stages'.
    assert plain.stages["ppo_train"].device_peak > plain.stages["sft"].device_peak
    assert offloaded.device_peak < plain.device_peak
    assert offloaded.host_peak > plain.host_peak
    flat = plain.flat_metrics()
    assert flat["mem/predicted_device_peak_bytes"] == plain.device_peak
    assert flat["mem/ppo_generate/predicted_device_peak_bytes"] > 0
