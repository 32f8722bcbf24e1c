"""GPU peak FLOP/s by exact model key after normalising NVML's device names."""

from __future__ import annotations

import pytest

from tunelab.gpus import PEAK_TFLOPS, model_key, peak_tflops

NAMES = [
    # (NVML / torch.cuda device name, model key)
    ("NVIDIA H100 80GB HBM3", "H100"),  # the SXM5 H100
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100-SXM4-40GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe"),
    ("NVIDIA A100-PCIE-40GB", "A100 PCIe"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L40", "L40"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA A10G", "A10G"),
    ("NVIDIA A10", "A10"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("Tesla V100-SXM2-32GB", "V100"),
    ("Tesla V100-PCIE-16GB", "V100 PCIe"),
    ("Tesla T4", "T4"),
]


@pytest.mark.parametrize(("name", "key"), NAMES)
def test_every_listed_name_maps_to_its_model(name, key):
    assert model_key(name) == key
    assert key in PEAK_TFLOPS


def test_exact_match_never_takes_a_prefix():
    """A substring match gave the L40 the L4's peak and the A100 PCIe or H200 NVL the SXM's."""
    assert peak_tflops("NVIDIA L40", "bf16") == 181.0
    assert peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert peak_tflops("NVIDIA L40S", "bf16") == 362.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200 NVL", "bf16") == 835.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert peak_tflops("Tesla V100-PCIE-16GB", "fp16") == 112.0


def test_unknown_mig_and_missing_precisions_give_none():
    assert peak_tflops("NVIDIA B200", "bf16") is None  # not in the table: ask for peak_tflops
    assert peak_tflops("NVIDIA A10G", "bf16") is None  # no published dense figure
    assert peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 on Volta
    # A MIG slice has a fraction of the SMs: the full GPU's peak would understate MFU.
    assert model_key("NVIDIA A100-SXM4-40GB MIG 1g.5gb") is None
    assert peak_tflops("NVIDIA H100 80GB HBM3 MIG 3g.40gb", "bf16") is None
    assert peak_tflops(None, "bf16") is None  # a CPU
    assert peak_tflops("NVIDIA L40", "bf16", override=100.0) == 100.0
