"""This node's GPUs as NVML sees them (no torch): partitioning among workers, and whether a
precision can run here, so a trial the device cannot do is never launched."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from tunelab.config import TrialConfig
from tunelab.errors import InputError


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_bytes: int
    compute_capability: tuple[int, int]


def gpu_inventory() -> list[Gpu]:
    """Every GPU NVML reports; empty without NVML or a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver: a CPU node
        return []
    gpus = []
    with contextlib.suppress(Exception):
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(
                Gpu(
                    index,
                    name.decode() if isinstance(name, bytes) else name,
                    pynvml.nvmlDeviceGetMemoryInfo(handle).total,
                    tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle)),
                )
            )
    return gpus


# DeepSpeed 0.19's hybrid engine swaps decoder layers for its inference kernels, whose layers
# return tuples where transformers 5 decoder loops expect a tensor, and it fuses only
# DeepSpeed-Chat's own LoRA layers (lora_right_weight), not peft's: generation would fail, or use
# the base weights while the adapters train. Refused everywhere until it supports both.
HYBRID_ENGINE_REASON = (
    "DeepSpeed 0.19's hybrid engine does not run transformers 5 models nor peft LoRA "
    "adapters; set hybrid_engine: false"
)


def config_unsupported_reason(config: TrialConfig) -> str | None:
    """Why no node can run this trial, whatever its devices (None when some can)."""
    if config.hybrid_engine:
        return HYBRID_ENGINE_REASON
    return None


def cpu_supports_fp16(cpuinfo: str | None = None) -> bool:
    """Whether DeepSpeed's CPU accelerator runs fp16 here: it asks oneDNN, which needs
    AVX512-FP16 or AMX-FP16 (torch's mkldnn_fp16 device check)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_fp16", "amx_fp16"})


def unsupported_reason(config: TrialConfig, gpus: list[Gpu]) -> str | None:
    """Why this node cannot run the trial (None when it can): the same verdicts the trial
    process would reach, found without starting it."""
    reason = config_unsupported_reason(config)
    if reason:
        return reason
    if not gpus:
        if config.precision == "fp16" and not cpu_supports_fp16():
            return "fp16 is not supported on the cpu accelerator (no AVX512-FP16 or AMX-FP16)"
        if config.device == "cuda":
            return "device=cuda requested on a node without GPUs"
        return None
    if config.precision == "bf16" and min(g.compute_capability for g in gpus) < (8, 0):
        return "bf16 needs compute capability 8.0 (Ampere) or newer"
    return None


def gpu_slots(workers: int, per_trial: int, gpus: list[Gpu]) -> list[list[int] | None]:
    """Disjoint GPU index lists, one per worker (None on a CPU node)."""
    if not gpus or per_trial == 0:
        return [None] * workers
    if workers * per_trial > len(gpus):
        raise InputError(
            f"{workers} workers x {per_trial} GPUs per trial exceed the {len(gpus)} GPUs here"
        )
    return [[g.index for g in gpus[w * per_trial : (w + 1) * per_trial]] for w in range(workers)]
