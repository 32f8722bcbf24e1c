"""Peak dense FLOP/s of common GPUs, keyed by the name NVML reports, for MFU (pure).

Figures are the vendors' datasheet numbers for dense tensor-core math (no 2:4 sparsity);
"fp32" is plain FP32 (no TF32). Override with the trial config's `peak_tflops` for anything
missing or different (clocks, power caps).
"""

from __future__ import annotations

# Ordered: the first key contained in the NVML name wins ("H100 PCIe" before "H100").
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "GH200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "A10G": {},  # AWS's variant: no published dense figure here; set peak_tflops
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}


def peak_tflops(device_name: str | None, precision: str, override: float | None = None):
    """Peak TFLOP/s per device for `precision`, or None when unknown (e.g. a CPU)."""
    if override is not None:
        return override
    if not device_name:
        return None
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(precision)
    return None


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
