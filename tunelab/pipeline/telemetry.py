"""Measurement inside the trial process: phase timers, per-stage memory peaks, NVML sampling.

Host memory: a sampler thread reads this process's resident set (/proc/self/statm) every few
milliseconds and keeps the peak per stage; VmHWM gives the exact lifetime peak. Device
memory: torch.cuda peak allocated/reserved, reset at each stage entry. NVML (device memory used,
the part of it outside PyTorch's allocator, utilisation, power) on a GPU; when NVML cannot be
used, `gpu/nvml_status` says why (and the log).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from tunelab.devices import non_torch_bytes, nvml_uuid_candidates
from tunelab.errors import TrialFailure

log = logging.getLogger("tunelab")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


def peak_rss_bytes(status_text: str | None = None) -> int:
    """This process's peak resident set over its life (VmHWM), imports included. Not
    ru_maxrss: Linux carries the parent's peak into it across vfork and exec, which is how
    subprocess starts a trial, so a trial started by a larger process (pytest that has run
    models, a busy orchestrator) would read that process's peak. The kernel reads its counters
    approximately: two readings can go down by a few pages (MemoryTracker keeps the largest)."""
    if status_text is None:
        with open("/proc/self/status") as handle:
            status_text = handle.read()
    line = next(x for x in status_text.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


class PhaseTimer:
    """Wall time of every step of every named phase, the device synchronised at both ends.

    A phase may be entered several times within one step (PPO's generation batches): its
    times add up. Which steps count towards throughput is the caller's choice (warm-up steps
    and steps whose optimizer step fp16 loss scaling skipped do not).
    """

    def __init__(self, synchronize) -> None:
        self._synchronize = synchronize
        self.steps: dict[str, dict[int, float]] = defaultdict(dict)

    @contextlib.contextmanager
    def phase(self, name: str, step: int) -> Iterator[None]:
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            elapsed = time.perf_counter() - start
            self.steps[name][step] = self.steps[name].get(step, 0.0) + elapsed

    def seconds(self, name: str, steps: Iterable[int]) -> float:
        """Total time of `name` over `steps`."""
        times = self.steps[name]
        return sum(times.get(step, 0.0) for step in steps)

    def series(self, name: str) -> list[float]:
        """Seconds per step of `name`, in step order (warm-up and skipped steps included)."""
        return [seconds for _, seconds in sorted(self.steps[name].items())]


def timed_steps(stage: str, steps: int, warmup: int, skipped: set[int]) -> list[int]:
    """Steps of a stage that count towards throughput: after the warm-up steps, and none in
    which fp16 dynamic loss scaling skipped an optimizer step (such a step does less work).

    Raises TrialFailure when none is left, since no figure could be measured."""
    timed = [step for step in range(warmup, steps) if step not in skipped]
    if not timed:
        raise TrialFailure(
            f"{stage}: every step after the {warmup} warm-up steps had an optimizer step "
            f"skipped by fp16 loss scaling ({len(skipped)} skipped); give the stage more steps"
        )
    return timed


def _nvml_handle(nvml, cuda_uuid: str):
    """(handle, the identifier that found it) of the NVML device torch calls `cuda_uuid`."""
    tried = nvml_uuid_candidates(cuda_uuid)
    for candidate in tried:
        with contextlib.suppress(nvml.NVMLError):
            return nvml.nvmlDeviceGetHandleByUUID(candidate), candidate
    raise RuntimeError(f"no NVML device has the CUDA device's UUID (tried {', '.join(tried)})")


class _NvmlSampler:
    """Device memory used (and the part outside PyTorch's allocator), utilisation and power of
    this rank's GPU or MIG slice, sampled by NVML. The device is matched by UUID, never by
    index: NVML's indices ignore CUDA_VISIBLE_DEVICES and may follow another order."""

    def __init__(self, device: torch.device) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._device = device
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        self._handle, self.uuid = _nvml_handle(pynvml, uuid)
        name = pynvml.nvmlDeviceGetName(self._handle)
        self.name = name.decode() if isinstance(name, bytes) else name
        self.memory_total = pynvml.nvmlDeviceGetMemoryInfo(self._handle).total
        self.used_peak = 0
        self.non_torch_peak = 0
        self._util: list[float] = []
        self._power: list[float] = []

    def sample(self) -> None:
        nvml = self._nvml
        reserved_before = torch.cuda.memory_reserved(self._device)
        used = nvml.nvmlDeviceGetMemoryInfo(self._handle).used
        reserved_after = torch.cuda.memory_reserved(self._device)
        self.used_peak = max(self.used_peak, used)
        self.non_torch_peak = max(
            self.non_torch_peak, non_torch_bytes(used, reserved_before, reserved_after)
        )
        # MIG slices report no utilisation or power: NVML_ERROR_NOT_SUPPORTED.
        with contextlib.suppress(nvml.NVMLError):
            self._util.append(nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
        with contextlib.suppress(nvml.NVMLError):
            self._power.append(nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0)

    def metrics(self) -> dict[str, float | str]:
        result: dict[str, float | str] = {
            "gpu/name": self.name,
            "gpu/memory_total_bytes": self.memory_total,
            "gpu/nvml_used_peak_bytes": self.used_peak,
            "mem/peak_device_non_torch_bytes": self.non_torch_peak,
        }
        if self._util:
            result["gpu/util_mean_pct"] = sum(self._util) / len(self._util)
        if self._power:
            result["gpu/power_mean_w"] = sum(self._power) / len(self._power)
        return result


class MemoryTracker:
    """Peak host RSS and device memory per stage, from a background sampler thread."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self._device = device
        self._interval = interval_s
        self._stage: str | None = None
        self.host_peak: dict[str, int] = defaultdict(int)
        # The largest of VmHWM's readings and the sampler's: the kernel's counters are
        # approximate, so two readings can disagree by a few pages.
        self._lifetime_host_peak = 0
        self.device_allocated: dict[str, int] = defaultdict(int)
        self.device_reserved: dict[str, int] = defaultdict(int)
        self._nvml: _NvmlSampler | None = None
        self._nvml_sampling = False
        self.nvml_status = ""  # "on (<uuid>)" or "off: <why>", on a CUDA device only
        if device.type == "cuda":
            try:
                self._nvml = _NvmlSampler(device)
                self._nvml_sampling = True
                self.nvml_status = f"on ({self._nvml.uuid})"
            except Exception as exc:  # no library, no driver, no matching device: say so
                self.nvml_status = f"off: {type(exc).__name__}: {exc}"
                log.warning("NVML telemetry %s", self.nvml_status)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tunelab-memory", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ticks = 0
        while not self._stop.wait(self._interval):
            stage = self._stage
            if stage is not None:
                self.host_peak[stage] = max(self.host_peak[stage], rss_bytes())
            ticks += 1
            if self._nvml_sampling and ticks % 20 == 0:
                try:
                    self._nvml.sample()
                except Exception as exc:  # stop sampling, keep what was read, say why
                    self.nvml_status = f"off after sampling failed: {type(exc).__name__}: {exc}"
                    log.warning("NVML telemetry %s", self.nvml_status)
                    self._nvml_sampling = False

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Attribute memory peaks inside the block to `name` (re-entry keeps the maximum)."""
        previous = self._stage
        self._stage = name
        self.host_peak[name] = max(self.host_peak[name], rss_bytes())
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        try:
            yield
        finally:
            self.host_peak[name] = max(self.host_peak[name], rss_bytes())
            if self._device.type == "cuda":
                self.device_allocated[name] = max(
                    self.device_allocated[name], torch.cuda.max_memory_allocated(self._device)
                )
                self.device_reserved[name] = max(
                    self.device_reserved[name], torch.cuda.max_memory_reserved(self._device)
                )
            self._stage = previous

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def peaks(self) -> dict[str, int]:
        """This rank's overall peaks up to now (`mem/peak_*_bytes`; device ones as of the last
        stage block left). They only grow: the final metrics are the last reading."""
        self._lifetime_host_peak = max(self._lifetime_host_peak, peak_rss_bytes(),
                                       *self.host_peak.values())  # fmt: skip
        result = {"mem/peak_host_rss_bytes": self._lifetime_host_peak}
        if self.device_allocated:
            result["mem/peak_device_allocated_bytes"] = max(self.device_allocated.values())
            result["mem/peak_device_reserved_bytes"] = max(self.device_reserved.values())
        return result

    def metrics(self) -> dict[str, float | str]:
        """`mem/<stage>/...` per stage plus the overall peaks of this rank."""
        result: dict[str, float | str] = {}
        for stage, peak in self.host_peak.items():
            result[f"mem/{stage}/peak_host_rss_bytes"] = peak
        for stage, peak in self.device_allocated.items():
            result[f"mem/{stage}/peak_device_allocated_bytes"] = peak
            result[f"mem/{stage}/peak_device_reserved_bytes"] = self.device_reserved[stage]
        result.update(self.peaks())
        if self._nvml is not None:
            result.update(self._nvml.metrics())
        if self.nvml_status:
            result["gpu/nvml_status"] = self.nvml_status
        return result


class ProgressLog:
    """JSON lines the orchestrator reads while the trial runs (intermediate values)."""

    def __init__(self, path: Path | None) -> None:
        self._path = path

    def write(self, stage: str, step: int, values: dict[str, float]) -> None:
        if self._path is None:
            return
        line = json.dumps({"stage": stage, "step": step, "time": time.time(), **values})
        with self._path.open("a") as handle:
            handle.write(line + "\n")


def throughput(name: str, seconds: float, samples: int, tokens: int, flops_per_rank: float):
    """`time/<name>_s` and `perf/<name>_*` figures; samples and tokens summed over ranks."""
    seconds = max(seconds, 1e-9)
    return {
        f"time/{name}_s": seconds,
        f"perf/{name}_samples_per_s": samples / seconds,
        f"perf/{name}_tokens_per_s": tokens / seconds,
        f"perf/{name}_tflops_per_rank": flops_per_rank / seconds / 1e12,
    }


# -- model states on a live engine ------------------------------------------------------------

_OPTIMIZER_ATTRS = frozenset(
    ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
     "fp32_groups_flat_partition", "fp32_groups_flat", "fp32_groups", "fp32_groups_partition")
)  # fmt: skip


def _category(path: tuple[str, ...]) -> str:
    """params / grads / optimizer / buffers, from where a tensor hangs on the engine."""
    if path[-1] == "grad":
        return "grads"
    if path[0] == "module":
        return "params"
    top = path[1]
    # "state"/"param_groups" belong to a bare torch optimizer (fp32 without ZeRO).
    if top in ("optimizer", "state", "param_groups") or top in _OPTIMIZER_ATTRS:
        return "optimizer"  # Adam moments and fp32 master weights (the basic optimizer's params)
    if "grad" in top and not top.startswith("temp_grad_buffer"):
        return "grads"
    return "buffers"  # reduce buckets, offload staging buffers


def engine_state_bytes(engine, accelerator: str) -> dict[str, dict[str, int]]:
    """Bytes of every tensor storage reachable from a live DeepSpeed engine, by category
    (params, grads, optimizer, buffers) and place ("device": the accelerator's memory, "host":
    CPU memory when the accelerator is not the CPU). Shared storages are counted once."""
    totals = {c: {"device": 0, "host": 0} for c in ("params", "grads", "optimizer", "buffers")}
    seen: set[int] = set()

    def add(tensor: torch.Tensor, path: tuple[str, ...]) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            place = "host" if tensor.device.type == "cpu" and accelerator != "cpu" else "device"
            totals[_category(path)][place] += storage.nbytes()

    def walk(obj, path: tuple[str, ...], depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            add(obj, path)
            if obj.grad is not None:
                add(obj.grad, (*path, "grad"))
            if hasattr(obj, "ds_tensor"):
                walk(obj.ds_tensor, path, depth + 1)
            return
        if depth > 6:
            return
        if isinstance(obj, dict):
            for value in obj.values():
                walk(value, path, depth + 1)
        elif isinstance(obj, list | tuple):
            for value in obj:
                walk(value, path, depth + 1)
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and not isinstance(
            obj, torch.nn.Module
        ):
            names = list(getattr(obj, "__dict__", {})) + list(getattr(type(obj), "__slots__", ()))
            for name in names:
                walk(
                    getattr(obj, name, None), (*path, name) if len(path) == 1 else path, depth + 1
                )

    for param in engine.module.parameters():
        walk(param, ("module",), 0)
    walk(engine.optimizer, ("optimizer",), 0)
    return totals
