"""The trial process's place in the world: rank, device, precision, collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from tunelab.config import TrialConfig
from tunelab.devices import config_unsupported_reason, zero0_offload_reason
from tunelab.errors import DivergedError, UnsupportedError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    accelerator: str  # DeepSpeed's accelerator name: "cuda" or "cpu"
    dtype: torch.dtype

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def synchronize(self) -> None:
        """Wait for queued device work, so host timers measure it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def all_mean(self, value: float) -> float:
        """Mean over ranks. Collectives take tensors on the rank's device: NCCL has no CPU
        backend ("No backend type associated with device type cpu")."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size

    def all_max(self, values: dict[str, float]) -> dict[str, float]:
        """Each value's maximum over ranks, in one collective (float64: exact for byte counts)."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return dict(zip(values, tensor.tolist(), strict=True))

    def all_gather(self, obj):
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def check_finite(self, loss: torch.Tensor, where: str) -> None:
        """Raise DivergedError on every rank together when any rank's loss is NaN or inf."""
        bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(bad)
        if bad.item() > 0:
            raise DivergedError(f"non-finite loss at {where}")


def start_runtime(config: TrialConfig) -> Runtime:
    """Join (or create) the process group and check the device can run this configuration.

    Under torchrun/deepspeed the launcher sets RANK and WORLD_SIZE; a lone process (tests,
    single-rank trials) becomes a group of one. Unsupported choices fail here, before any model
    is built, with UnsupportedError.
    """
    reason = config_unsupported_reason(config)
    if reason:
        raise UnsupportedError(reason)
    accelerator = get_accelerator()
    name = accelerator.device_name()
    if config.device == "cuda" and name != "cuda":
        raise UnsupportedError(f"device=cuda requested but DeepSpeed's accelerator is {name}")
    if config.device == "cpu" and name != "cpu":
        raise UnsupportedError(
            "device=cpu on a machine with an accelerator: set DS_ACCELERATOR=cpu for the trial"
        )
    if config.precision == "fp16" and not accelerator.is_fp16_supported():
        raise UnsupportedError(f"fp16 is not supported on the {name} accelerator")
    if config.precision == "bf16" and not accelerator.is_bf16_supported():
        raise UnsupportedError(f"bf16 is not supported on the {name} accelerator")
    if name != "cpu" and (reason := zero0_offload_reason(config)):
        raise UnsupportedError(reason)
    if "cpu" in (config.actor.offload_optimizer, config.critic.offload_optimizer):
        from deepspeed.ops.op_builder import CPUAdamBuilder

        if not CPUAdamBuilder().is_compatible(verbose=False):
            raise UnsupportedError(
                "optimizer offload needs DeepSpeed's CPU Adam op, not buildable here"
            )

    backend = accelerator.communication_backend_name()
    if not dist.is_initialized() and "MASTER_ADDR" not in os.environ:
        # A lone process (launchers set MASTER_ADDR): an in-memory store, so no TCP port can
        # be taken from under it.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend)
    world_size = dist.get_world_size()
    if world_size != config.ranks:
        raise UnsupportedError(f"config asks for {config.ranks} ranks, launched with {world_size}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "cuda":
        accelerator.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Runtime(dist.get_rank(), world_size, device, name, _DTYPES[config.precision])
