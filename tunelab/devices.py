"""This node's GPUs as NVML sees them (no torch): partitioning among workers, and whether a
precision can run here, so a trial the device cannot do is never launched."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

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


def unsupported_reason(config: TrialConfig, gpus: list[Gpu]) -> str | None:
    """Why this node cannot run the trial (None when it can): the same verdicts the trial
    process would reach, found without starting it."""
    if not gpus:
        if config.precision == "fp16":
            return "fp16 is not supported on the cpu accelerator"
        if config.hybrid_engine:
            return "DeepSpeed's hybrid engine needs CUDA, accelerator is cpu"
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
