"""This node's GPUs as NVML sees them (no torch): partitioning among workers, and whether a
precision can run here, so a trial the device cannot do is never launched.

A GPU's `index` is its position in PCI bus order, which is CUDA's order under
CUDA_DEVICE_ORDER=PCI_BUS_ID. CUDA's default order (FASTEST_FIRST) may differ on a node with
mixed GPUs, so trial processes get CUDA_DEVICE_ORDER=PCI_BUS_ID with their CUDA_VISIBLE_DEVICES
slice (`trial_cuda_env`): the indices then name the GPUs the inventory meant.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from tunelab.config import TrialConfig
from tunelab.errors import InputError

PCI_ORDER = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


@dataclass(frozen=True)
class Gpu:
    index: int  # CUDA's index under CUDA_DEVICE_ORDER=PCI_BUS_ID
    name: str
    memory_bytes: int
    compute_capability: tuple[int, int]
    uuid: str = ""  # NVML's "GPU-..." identifier
    pci_bus_id: str = ""


def pci_sort_key(bus_id: str) -> tuple[int, ...]:
    """Numeric (domain, bus, device, function) of a PCI bus id such as "00000000:3B:00.0"."""
    domain, bus, rest = bus_id.strip().split(":")
    device, function = rest.split(".")
    return tuple(int(part, 16) for part in (domain, bus, device, function))


def in_pci_order(gpus: list[Gpu]) -> list[Gpu]:
    """The GPUs renumbered by PCI bus id, as CUDA numbers them under PCI_BUS_ID."""
    ordered = sorted(gpus, key=lambda g: pci_sort_key(g.pci_bus_id))
    return [
        Gpu(i, g.name, g.memory_bytes, g.compute_capability, g.uuid, g.pci_bus_id)
        for i, g in enumerate(ordered)
    ]


def visible_gpus(gpus: list[Gpu], visible: str | None) -> list[Gpu]:
    """The GPUs an inherited CUDA_VISIBLE_DEVICES allows (indices in PCI bus order, or GPU
    UUIDs or their unique prefixes), in its order; all of them when it is unset."""
    if visible is None or not visible.strip():
        return gpus
    chosen = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit():
            matches = [g for g in gpus if g.index == int(entry)]
        elif entry.startswith("GPU-"):
            matches = [g for g in gpus if g.uuid.startswith(entry)]
        else:
            matches = []
        if len(matches) != 1:
            raise InputError(
                f"CUDA_VISIBLE_DEVICES={visible}: entry {entry!r} names no single GPU of this "
                "node (tunelab splits whole GPUs among workers by index in PCI bus order or by "
                "GPU UUID)"
            )
        chosen.append(matches[0])
    return chosen


def cuda_device_files() -> bool:
    """Whether the NVIDIA driver exposes a GPU here (/dev/nvidia0, ...), NVML or not: a
    container may lack libnvidia-ml and still run CUDA."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def trial_cuda_env(gpus: list[int] | None) -> dict[str, str]:
    """Environment of a trial process: CUDA's order set to NVML's (PCI bus), and the worker's
    GPU slice when it has one."""
    if gpus is None:
        return dict(PCI_ORDER)
    return {**PCI_ORDER, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}


def nvml_uuid_candidates(cuda_uuid: str) -> list[str]:
    """The identifiers NVML may know a CUDA device by, most likely first.

    torch reports a device's UUID without NVML's prefix: "GPU-" for a whole GPU, "MIG-" for a
    MIG slice (nvmlDeviceGetHandleByUUID accepts both). A UUID that already has one is tried
    as given first.
    """
    uuid = cuda_uuid.strip()
    bare = uuid.removeprefix("GPU-").removeprefix("MIG-")
    candidates = [uuid, f"GPU-{bare}", f"MIG-{bare}"]
    return list(dict.fromkeys(candidates))  # in order, each once


def non_torch_bytes(nvml_used: int, reserved_before: int, reserved_after: int) -> int:
    """Device memory outside PyTorch's allocator (CUDA context, NCCL buffers, other libraries):
    NVML's used bytes minus torch's reserved bytes, read just before and after NVML. The larger
    of the two is subtracted, so a change in between can only make the figure smaller."""
    return max(0, nvml_used - max(reserved_before, reserved_after))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def gpu_inventory() -> list[Gpu]:
    """Every GPU NVML reports that CUDA_VISIBLE_DEVICES allows, numbered in PCI bus order;
    empty without NVML or a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver: a CPU node
        return []
    gpus = []
    with contextlib.suppress(Exception):
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(
                Gpu(
                    index,
                    _text(pynvml.nvmlDeviceGetName(handle)),
                    pynvml.nvmlDeviceGetMemoryInfo(handle).total,
                    tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle)),
                    _text(pynvml.nvmlDeviceGetUUID(handle)),
                    _text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
                )
            )
    return visible_gpus(in_pci_order(gpus), os.environ.get("CUDA_VISIBLE_DEVICES"))


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
    return zero0_offload_reason(config)


def zero0_offload_reason(config: TrialConfig) -> str | None:
    """Optimizer offload at ZeRO-0 on a GPU: DeepSpeed 0.19 keeps the fp32 master weights beside
    the parameters, on the GPU, and its DeepSpeedCPUAdam asserts "CPUAdam param is on cuda and
    must be 'cpu'" (deepspeed/ops/adam/cpu_adam.py); it runs on the CPU accelerator only."""
    for role in ("actor", "critic"):
        engine = getattr(config, role)
        if engine.zero_stage == 0 and engine.offload_optimizer == "cpu":
            return (f"{role}.offload_optimizer=cpu at ZeRO-0: DeepSpeed 0.19 runs CPU Adam there "
                    "only with parameters in host memory (the CPU accelerator)")  # fmt: skip
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
