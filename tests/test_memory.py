"""The pure memory model: hand-computed cases, DeepSpeed's own estimators and defaults, the
setup stage, logits, and how a stage's peak combines its parts."""

from __future__ import annotations

import pytest
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from tunelab.config import EngineConfig, load_config
from tunelab.dsconfig import engine_ds_configs, train_ds_config
from tunelab.memory import (
    CUDA_CONTEXT_BYTES,
    GIB,
    NCCL_BUFFER_BYTES,
    SetupMemory,
    ZeroSettings,
    activation_bytes,
    engine_states,
    engine_tensors,
    kv_cache_bytes,
    logits_bytes,
    predict,
)
from tunelab.metrics import is_metric_name
from tunelab.presets import PRESETS

from .conftest import ROOT

OPT13, OPT350 = PRESETS["opt-1.3b"], PRESETS["opt-350m"]
P13 = 1_315_758_080
DSCHAT = ROOT / "studies" / "trials" / "opt-1.3b-opt-350m.yaml"
BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size, which DeepSpeed-Chat keeps


def _zero(stage, **engine):
    """The ZeroSettings tunelab's DeepSpeed config gives an actor engine."""
    config = load_config(None, [])
    return ZeroSettings.from_ds_config(
        train_ds_config(config, EngineConfig(zero_stage=stage, **engine), 1e-5)
    )


def _actor(zero_stage, ranks, precision="bf16", **engine):
    trainable, frozen = engine_tensors(OPT13, EngineConfig(zero_stage=zero_stage, **engine), False)
    return engine_states(
        trainable, frozen, _zero(zero_stage, **engine), ranks=ranks, precision=precision
    )


def test_settings_defaults_are_deepspeeds():
    """What a config leaves out takes DeepSpeed 0.19's own default."""
    for stage in (0, 1, 2, 3):
        ours = ZeroSettings.from_ds_config({"zero_optimization": {"stage": stage}})
        theirs = DeepSpeedZeroConfig(stage=stage)
        assert ours.reduce_bucket == theirs.reduce_bucket_size
        assert ours.overlap_comm == theirs.overlap_comm
        assert ours.contiguous_gradients == theirs.contiguous_gradients
        assert ours.persistence_threshold == theirs.param_persistence_threshold
        assert ours.max_live_parameters == theirs.max_live_parameters
    assert ZeroSettings.from_ds_config({}) == ZeroSettings()


def test_settings_follow_the_trial_config():
    """tunelab's configs keep DeepSpeed-Chat's ZeRO-3 thresholds and DeepSpeed's buckets."""
    config = load_config(DSCHAT, ["actor.zero_stage=3", "actor.offload_optimizer=cpu"])
    actor = ZeroSettings.from_ds_config(engine_ds_configs(config)["actor"])
    assert (actor.stage, actor.offload_optimizer, actor.offload_params) == (3, True, False)
    assert (actor.persistence_threshold, actor.max_live_parameters) == (10_000, 30_000_000)
    assert actor.reduce_bucket == BUCKET and actor.overlap_comm
    assert not _zero(1).overlap_comm and _zero(2).overlap_comm
    custom = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}}
    assert ZeroSettings.from_ds_config(custom).reduce_bucket == 1000


def test_zero1_full_gradients_during_backward_paper_figure():
    """ZeRO paper, stage 1 (P_os): 2Psi + 2Psi + 12Psi/N at the peak of backward, plus the one
    reduce bucket DeepSpeed allocates (no overlap_comm at stage 1)."""
    states = _actor(1, 8)
    assert states.backward_grads.device == 2 * P13  # every 16-bit gradient
    assert states.buckets.device == 2 * BUCKET
    paper = states.params + states.backward_grads + states.optimizer
    assert paper.device == pytest.approx(2 * P13 + 2 * P13 + 12 * P13 / 8, abs=8)
    assert states.grads.device == pytest.approx(2 * P13 / 8, abs=1)  # after the reduction
    # ZeRO-2 reduces in hooks into two buckets (overlap_comm) and keeps only its partition.
    zero2 = _actor(2, 8)
    assert zero2.buckets.device == 2 * 2 * BUCKET
    assert zero2.backward_grads.device == pytest.approx(
        2 * P13 / 8 + 2 * max(OPT13.param_tensors()), abs=1
    )


def test_zero2_by_hand_opt13b_on_8_ranks():
    states = _actor(2, 8)
    assert states.params.device == 2 * P13  # 16-bit weights, whole
    assert states.grads.device == pytest.approx(2 * P13 / 8, abs=1)  # 16-bit partition
    assert states.optimizer.device == pytest.approx(12 * P13 / 8, abs=2)  # master + moments
    # step: the flattened 16-bit partition and its fp32 cast
    assert states.step_transient.device == pytest.approx(6 * P13 / 8, abs=1)
    assert states.model_states.total == pytest.approx(2 * P13 + 14 * P13 / 8, abs=4)
    assert not states.persistent_grads  # freed after the step: not held during generation
    assert states.resident.device == states.params.device + states.optimizer.device


def test_zero2_matches_deepspeed_estimator():
    """DeepSpeed's 2P + 18P/N counts the fp32 gradient inside step (4P/N), not the flattened
    16-bit copy beside it (2P/N)."""
    for ranks in (1, 8, 64):
        _, gpu = estimate_zero2_model_states_mem_needs(P13, ranks, 1, cpu_offload=False)
        states = _actor(2, ranks)
        ours = states.model_states.device + states.step_transient.device - 2 * P13 / ranks
        assert ours == pytest.approx(gpu, abs=8)
        cpu, gpu = estimate_zero2_model_states_mem_needs(P13, ranks, 1, cpu_offload=True)
        offloaded = _actor(2, ranks, offload_optimizer="cpu")
        assert offloaded.model_states.device == gpu  # 2P: only the 16-bit weights stay
        # DeepSpeed's host figure is for the node (ranks x ours) with a 1.5 buffer factor.
        if ranks <= 4:
            assert offloaded.model_states.host * ranks * 1.5 == pytest.approx(cpu, rel=1e-6)


def test_offload_staging_buffers_sit_where_deepspeed_puts_them():
    """ZeRO-1/2 offload: the 16-bit partition buffer and one staging buffer on the host, one
    staging buffer of the largest tensor on the device (stage_1_and_2.py)."""
    states = _actor(2, 8, offload_optimizer="cpu")
    largest = max(OPT13.param_tensors())
    assert states.buffers.device == 2 * largest
    assert states.buffers.host == pytest.approx(2 * P13 / 8 + 2 * largest, abs=1)
    assert states.grads.host == pytest.approx(4 * P13 / 8, abs=1) and states.persistent_grads
    zero3 = _actor(3, 8, offload_optimizer="cpu")
    assert zero3.grads.device == 0  # both gradient partitions on the host
    assert zero3.grads.host == pytest.approx(6 * P13 / 8, abs=2)


def test_zero3_matches_deepspeed_estimator_up_to_its_terms():
    ranks = 8
    zero = _zero(3)
    largest = max(OPT13.param_tensors())
    _, gpu, _ = estimate_zero3_model_states_mem_needs(P13, largest, ranks, 1, cpu_offload=False,
                                                   cpu_offload_params=False)  # fmt: skip
    states = _actor(3, ranks)
    persistent = 2 * sum(t for t in OPT13.param_tensors() if t <= zero.persistence_threshold)
    # DeepSpeed: 4 x largest layer + 18P/N, 18 = 2 params + 4 fp32 grads + 12 optimizer; it
    # leaves out the 16-bit gradient partition (2P/N), its flattened copy in step (2P/N) and
    # the persistent whole tensors we count.
    ours = states.model_states.device + states.step_transient.device
    assert ours - 4 * P13 / ranks - persistent == pytest.approx(gpu - 4 * largest, abs=16)
    assert states.buffers.device == 2 * BUCKET  # the reduce bucket, kept for the engine's life
    assert states.persistent_grads


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
    shape = OPT350  # h 1024, 16 heads, 24 layers
    s, b, h, a = 512, 4, 1024, 16
    eager = s * b * h * (34 + 5 * a * s / h)  # Korthikanti et al. eq. 2
    assert activation_bytes(shape, b, s, False, "bf16", eager_attention=True) == 24 * eager
    fused = 34 * s * b * h  # SDPA keeps no score matrices
    assert activation_bytes(shape, b, s, False, "bf16") == 24 * fused
    assert activation_bytes(shape, b, s, True, "bf16") == 2 * s * b * h * 24 + fused
    assert activation_bytes(shape, b, s, False, "fp32") == 2 * 24 * fused
    assert kv_cache_bytes(shape, 8, 512, "bf16") == 2 * 24 * 8 * 512 * 1024 * 2


def test_logits_at_their_real_bytes_per_element():
    """SFT loss: 12 bytes per logit at its peak (backward's three fp32 tensors); PPO
    log-probabilities: 16-bit logits + fp32 scaled logits + CUDA's contiguous copy + the
    log-softmax = 14 bytes (16 when the model is fp32)."""
    elements = 4 * 100 * OPT13.vocab_size
    assert logits_bytes(OPT13, 4, 100, "bf16", "loss") == 12 * elements
    assert logits_bytes(OPT13, 4, 100, "fp32", "loss") == 12 * elements
    assert logits_bytes(OPT13, 4, 100, "bf16", "logprobs") == 14 * elements
    assert logits_bytes(OPT13, 4, 100, "fp16", "logprobs") == 14 * elements
    assert logits_bytes(OPT13, 4, 100, "fp32", "logprobs") == 16 * elements
    config = load_config(DSCHAT, ["batch.train_micro=4", "batch.generation_micro=4"])
    prediction = predict(config, OPT13, OPT350)
    positions = config.ppo.max_prompt_len + config.ppo.max_answer_len
    assert prediction.stages["sft"].training["actor"]["logits"] == logits_bytes(
        OPT13, 4, positions, config.precision, "loss"
    )
    answer = config.ppo.max_answer_len + 1  # logits_to_keep
    assert prediction.stages["ppo_experience"].transient["logits"] == 14 * 4 * answer * 50272


def test_ppo_trains_actor_then_critic_so_the_larger_counts():
    config = load_config(DSCHAT, ["actor.lora_rank=0"])
    stage = predict(config, OPT13, OPT350).stages["ppo_train"]
    resident = sum(e.resident.device for e in stage.engines.values())
    actor = stage.engines["actor"].training_extra(sum(stage.training["actor"].values()))
    critic = stage.engines["critic"].training_extra(sum(stage.training["critic"].values()))
    assert stage.device_peak == resident + max(actor.device, critic.device)
    assert stage.device_peak < resident + actor.device + critic.device


def test_setup_builds_models_one_at_a_time():
    """Without ZeRO-3 a model is built whole on the host in the engine's dtype; the hand-off
    state dicts wait in rank 0's host memory."""
    config = load_config(DSCHAT, ["precision=bf16", "actor.lora_rank=0"])
    setup = predict(config, OPT13, OPT350).stages["setup"]
    assert isinstance(setup, SetupMemory)
    assert list(setup.moments) == [
        "sft", "rm", "ppo actor", "ppo reference", "ppo critic", "ppo reward",
    ]  # fmt: skip
    sft_weights = 2 * P13
    rm_weights = 2 * (OPT350.num_params(lm_head=False) + OPT350.output_dim)
    assert setup.moments["sft"].host_transient == {"sft (building)": 2 * P13}
    assert setup.moments["rm"].host_transient["sft weights (rank 0)"] == sft_weights
    actor = setup.moments["ppo actor"]
    assert actor.host_peak == sft_weights + rm_weights + 2 * P13
    assert set(setup.moments["ppo reward"].transient) == {
        "actor (built)", "reference (built)", "critic (built)", "reward (building)",
    }  # fmt: skip
    # Adam's moments appear at the first step: a built ZeRO-2 actor holds its master only.
    zero2 = predict(config.replace(actor=EngineConfig(zero_stage=2)), OPT13, OPT350)
    built = zero2.stages["setup"].moments["ppo reference"].transient["actor (built)"]
    states = zero2.stages["ppo_train"].engines["actor"]
    assert built == states.params.device + states.master.device


def test_zero3_setup_holds_partitions_not_the_whole_model():
    """Under ZeRO-3 models are built partitioned (zero.Init): per rank, far below the whole
    16-bit model on the device, nothing whole on the host."""
    config = load_config(DSCHAT, ["ranks=8", "precision=bf16", "actor.lora_rank=0",
                                  "actor.zero_stage=3", "critic.zero_stage=3"])  # fmt: skip
    setup = predict(config, OPT13, OPT350).stages["setup"]
    reference = setup.moments["ppo reference"].transient["reference (building)"]
    partition = 2 * P13 / 8
    largest = 2 * max(OPT13.param_tensors())  # whole for a moment before it is partitioned
    assert partition + largest < reference < partition + largest + 0.05 * 2 * P13
    assert setup.moments["sft"].host_transient == {"sft (building)": 0}
    plain = predict(config.replace(ranks=1, actor=EngineConfig(), critic=EngineConfig()),
                    OPT13, OPT350).stages["setup"]  # fmt: skip
    assert plain.moments["sft"].host_peak == 2 * P13


def test_stage_peaks_order_offload_and_headroom():
    config = load_config(None, ["ppo.max_prompt_len=256", "ppo.max_answer_len=256"])
    plain = predict(config, OPT13, OPT350)
    offloaded = predict(
        config.replace(actor=EngineConfig(zero_stage=2, offload_optimizer="cpu")), OPT13, OPT350
    )
    assert set(plain.stages) == {
        "setup", "sft", "rm", "ppo_generate", "ppo_experience", "ppo_train",
    }  # fmt: skip
    # PPO holds four models, so its peaks exceed the supervised stages'.
    assert plain.stages["ppo_train"].device_peak > plain.stages["sft"].device_peak
    assert offloaded.device_peak < plain.device_peak
    assert offloaded.host_peak > plain.host_peak
    # "fits" verdicts use device_peak: PyTorch's allocations plus the CUDA context (and NCCL's
    # buffers with several ranks); the flat metrics compare like with like.
    assert plain.device_peak == plain.device_peak_allocated + CUDA_CONTEXT_BYTES
    eight = predict(config.replace(ranks=8), OPT13, OPT350)
    assert eight.headroom == CUDA_CONTEXT_BYTES + NCCL_BUFFER_BYTES == 1.5 * GIB
    flat = plain.flat_metrics()
    assert flat["mem/predicted_device_peak_bytes"] == plain.device_peak_allocated
    assert flat["mem/predicted_device_headroom_bytes"] == CUDA_CONTEXT_BYTES
    assert flat["mem/setup/predicted_host_peak_bytes"] == plain.stages["setup"].host_peak
    assert flat["mem/ppo_generate/predicted_device_peak_bytes"] > 0


def test_hybrid_engine_is_not_modelled():
    """The hybrid engine is refused before launch; the prediction ignores the flag."""
    config = load_config(DSCHAT, ["actor.zero_stage=3", "critic.zero_stage=3", "ranks=8"])
    on, off = (
        predict(config.replace(hybrid_engine=flag), OPT13, OPT350) for flag in (True, False)
    )
    assert on.flat_metrics() == off.flat_metrics()
    # ZeRO-3 generation gathers every partitioned actor tensor: a whole buffer per tensor.
    gather = off.stages["ppo_generate"].transient["generation_gather"]
    partitioned = sum(t for t in OPT13.param_tensors() if t > 10_000)
    trainable, frozen = engine_tensors(OPT13, config.actor, False)
    assert gather == 2 * sum(t for t in trainable + frozen if t > 10_000)
    assert gather > 2 * partitioned  # the LoRA adapters too


def test_every_predicted_and_telemetry_metric_name_is_registered():
    prediction = predict(load_config(DSCHAT, []), OPT13, OPT350)
    names = [*prediction.flat_metrics(), "mem/peak_device_non_torch_bytes", "gpu/nvml_status",
             "mem/setup/peak_host_rss_bytes", "mem/setup/peak_device_allocated_bytes"]  # fmt: skip
    assert "mem/setup/predicted_device_peak_bytes" in names
    assert [name for name in names if not is_metric_name(name)] == []
