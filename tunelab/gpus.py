"""Peak dense FLOP/s of common GPUs, keyed by model, for MFU (pure).

Figures are the vendors' datasheet numbers for dense tensor-core math (no 2:4 sparsity);
"fp32" is plain FP32 (no TF32). NVML's device names are normalised to a model key and looked
up exactly, so "L40" never takes the L4's figures. Override with the trial config's
`peak_tflops` for anything missing or different (clocks, power caps, MIG slices).
"""

from __future__ import annotations

import re

_HOPPER = {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}
_HOPPER_NVL = {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": _HOPPER,  # SXM
    "H200 NVL": _HOPPER_NVL,
    "GH200": _HOPPER,
    "H100": _HOPPER,  # SXM5: NVML says "H100 80GB HBM3"
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100 NVL": _HOPPER_NVL,
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},  # SXM4
    "A100 PCIe": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "L40": {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "A10G": {},  # AWS's variant: no published dense figure here; set peak_tflops
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},  # SXM2
    "V100 PCIe": {"fp16": 112.0, "fp32": 14.0},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}

_VENDOR = {"NVIDIA", "TESLA", "GEFORCE", "QUADRO"}
# Memory size and type say nothing about compute: "80GB", "HBM3", "HBM2e".
_MEMORY = re.compile(r"\d+GB|HBM\d?E?", re.IGNORECASE)
_SXM = re.compile(r"SXM\d?", re.IGNORECASE)  # the default form factor of a model key


def model_key(device_name: str) -> str | None:
    """The PEAK_TFLOPS key of an NVML/CUDA device name, or None for a MIG slice (a fraction of
    the GPU's SMs, whose peak the table does not hold).

    "NVIDIA H100 80GB HBM3" -> "H100"; "NVIDIA A100-SXM4-80GB" -> "A100";
    "NVIDIA A100 80GB PCIe" -> "A100 PCIe"; "Tesla V100-PCIE-16GB" -> "V100 PCIe".
    """
    words = device_name.replace("-", " ").split()
    if any(word.upper() == "MIG" for word in words):
        return None
    kept = []
    for word in words:
        if word.upper() in _VENDOR or _MEMORY.fullmatch(word) or _SXM.fullmatch(word):
            continue
        if word.upper() == "PCIE":
            word = "PCIe"
        kept.append(word.upper() if word.upper() == "NVL" else word)
    return " ".join(kept)


def peak_tflops(device_name: str | None, precision: str, override: float | None = None):
    """Peak TFLOP/s per device for `precision`, or None when unknown (e.g. a CPU)."""
    if override is not None:
        return override
    if not device_name:
        return None
    key = model_key(device_name)
    return PEAK_TFLOPS.get(key, {}).get(precision) if key else None


def mfu_metrics(metrics: dict[str, float], peak: float | None) -> dict[str, float]:
    """`perf/<phase>_mfu` = achieved model TFLOP/s per rank / peak, for every phase measured."""
    if not peak:
        return {}
    suffix = "_tflops_per_rank"
    return {
        f"{name[: -len(suffix)]}_mfu": value / peak
        for name, value in metrics.items()
        if name.startswith("perf/") and name.endswith(suffix)
    }
