"""`tunelab estimate`: breakdown tables and the largest micro-batch per ZeRO/offload choice."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunelab.config import load_config
from tunelab.estimate import GIB, SETTINGS, breakdown, largest_micro_batch
from tunelab.gpus import mfu_metrics, peak_tflops
from tunelab.memory import predict
from tunelab.presets import PRESETS

from .conftest import ROOT

DSCHAT = ROOT / "studies" / "trials" / "opt-1.3b-opt-350m.yaml"
P13, P350 = PRESETS["opt-1.3b"].num_params(), PRESETS["opt-350m"].num_params()


def test_breakdown_by_hand_zero2_full_finetuning_on_8_ranks():
    config = load_config(
        DSCHAT, ["ranks=8", "actor.zero_stage=2", "actor.lora_rank=0", "precision=bf16"]
    )
    table = breakdown(predict(config, PRESETS["opt-1.3b"], PRESETS["opt-350m"]))
    actor = table[(table.stage == "sft") & (table.item == "actor")].iloc[0]
    assert actor.params * GIB == pytest.approx(2 * P13)
    assert actor.grads * GIB == pytest.approx(2 * P13 / 8)
    assert actor.optimizer * GIB == pytest.approx(12 * P13 / 8)
    assert actor.step * GIB == pytest.approx(6 * P13 / 8)  # flattened 16-bit + fp32 cast
    assert actor.backward * GIB == pytest.approx(
        2 * P13 / 8 + 2 * max(PRESETS["opt-1.3b"].param_tensors()) + 2 * 2 * 500_000_000
    )  # + two reduce buckets
    reference = table[(table.stage == "ppo_train") & (table.item == "reference")].iloc[0]
    assert reference.device * GIB == pytest.approx(2 * P13)  # ZeRO-0 reference: whole 16-bit


def test_more_ranks_and_offload_fit_larger_batches():
    config = load_config(DSCHAT, ["actor.lora_rank=0", "hybrid_engine=false"])
    actor, critic = PRESETS["opt-1.3b"], PRESETS["opt-350m"]
    one = largest_micro_batch(config, actor, critic, budget=24 * GIB)
    eight = largest_micro_batch(config.replace(ranks=8), actor, critic, budget=24 * GIB)
    assert list(one["setting"]) == [label for label, *_ in SETTINGS]
    best = dict(zip(one["setting"], one["max micro-batch"], strict=True))
    best8 = dict(zip(eight["setting"], eight["max micro-batch"], strict=True))
    # Four models of 1.3B + 350M parameters, fully trained, overflow 24 GiB unless offloaded.
    assert best["ZeRO-0"] == best["ZeRO-2"] == 0
    assert best["ZeRO-2 + optimizer offload"] > 0
    assert best8["ZeRO-3"] > best8["ZeRO-2"] > best8["ZeRO-0"]  # partitions shrink with ranks
    fitting = one[one["max micro-batch"] > 0]
    assert (fitting["device peak at it (GiB)"] <= 24).all()


@pytest.mark.parametrize("ranks", [1, 8])
def test_estimate_command_prints_breakdown(ranks):
    run = subprocess.run(
        [sys.executable, "-m", "tunelab", "estimate", str(DSCHAT), "--ranks", str(ranks),
         "--gpu-mem", "80"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert f"{ranks} rank(s)" in out
    for stage in ("setup", "sft", "rm", "ppo_generate", "ppo_experience", "ppo_train"):
        assert f"{stage}" in out
    assert "building ppo critic" in out
    headroom = 1.5 if ranks > 1 else 1.0  # CUDA context (+ NCCL buffers)
    assert f"+ {headroom:.2f} CUDA context/NCCL headroom" in out
    assert "Largest micro-batch that fits in 80 GiB" in out
    assert "ZeRO-3 + optimizer and param offload" in out


def test_estimate_bad_input_exits_2():
    run = subprocess.run(
        [sys.executable, "-m", "tunelab", "estimate", str(DSCHAT), "models.actor=nope"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "not a preset" in run.stderr


def test_mfu_from_the_gpu_table_and_override():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 on Volta
    assert peak_tflops(None, "bf16") is None  # a CPU
    assert peak_tflops("NVIDIA A10G", "bf16") is None  # unknown: ask for an override
    assert peak_tflops("anything", "bf16", override=100.0) == 100.0
    metrics = {"perf/ppo_train_tflops_per_rank": 247.25, "perf/sft_tokens_per_s": 5.0}
    assert mfu_metrics(metrics, 989.0) == {"perf/ppo_train_mfu": pytest.approx(0.25)}
    assert mfu_metrics(metrics, None) == {}
