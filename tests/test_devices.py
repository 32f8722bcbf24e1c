"""GPU inventory helpers: PCI bus order, an inherited CUDA_VISIBLE_DEVICES, the trial's CUDA
environment, NVML lookups (pure; no GPU needed)."""

from __future__ import annotations

import pytest

from tunelab.devices import (
    Gpu,
    gpu_slots,
    in_pci_order,
    non_torch_bytes,
    nvml_uuid_candidates,
    pci_sort_key,
    trial_cuda_env,
    visible_gpus,
)
from tunelab.errors import InputError


def _gpu(index, bus, uuid):
    return Gpu(index, "NVIDIA H100 80GB HBM3", 80 * 2**30, (9, 0), uuid, bus)


# NVML's enumeration order need not be PCI bus order; CUDA's PCI_BUS_ID order is.
NVML = [
    _gpu(0, "00000000:B3:00.0", "GPU-cc"),
    _gpu(1, "00000000:1B:00.0", "GPU-aa"),
    _gpu(2, "00000001:05:00.0", "GPU-dd"),
    _gpu(3, "00000000:3B:00.0", "GPU-bb"),
]


def test_gpus_are_numbered_in_pci_bus_order():
    assert pci_sort_key("00000000:3B:00.1") == (0, 0x3B, 0, 1)
    ordered = in_pci_order(NVML)
    assert [g.uuid for g in ordered] == ["GPU-aa", "GPU-bb", "GPU-cc", "GPU-dd"]
    assert [g.index for g in ordered] == [0, 1, 2, 3]


def test_inherited_visible_devices_restrict_the_inventory():
    gpus = in_pci_order(NVML)
    assert visible_gpus(gpus, None) == gpus
    assert visible_gpus(gpus, "") == gpus
    assert [g.uuid for g in visible_gpus(gpus, "3,1")] == ["GPU-dd", "GPU-bb"]
    assert [g.index for g in visible_gpus(gpus, "GPU-c, GPU-aa")] == [2, 0]  # UUID prefixes
    # Slots keep the GPUs' own indices, which the trial's CUDA_VISIBLE_DEVICES then names.
    assert gpu_slots(2, 1, visible_gpus(gpus, "3,1")) == [[3], [1]]


@pytest.mark.parametrize("visible", ["7", "MIG-1234", "GPU-zz", "GPU-"])
def test_visible_devices_it_cannot_map_are_refused(visible):
    with pytest.raises(InputError, match="CUDA_VISIBLE_DEVICES"):
        visible_gpus(in_pci_order(NVML), visible)


def test_trial_processes_get_pci_bus_order():
    assert trial_cuda_env(None) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert trial_cuda_env([2, 3]) == {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2,3",
    }  # fmt: skip


def test_nvml_is_asked_for_the_uuid_with_each_prefix():
    """torch's UUID of a MIG slice is not "GPU-" prefixed; NVML's handle lookup needs the
    prefix, "MIG-" for a slice."""
    bare = "5f0bfc46-9b1c-4f4e-8c5e-2a7f3c9e1d20"
    assert nvml_uuid_candidates(bare) == [bare, f"GPU-{bare}", f"MIG-{bare}"]
    assert nvml_uuid_candidates(f"MIG-{bare}") == [f"MIG-{bare}", f"GPU-{bare}"]
    assert nvml_uuid_candidates(f"GPU-{bare}")[0] == f"GPU-{bare}"


def test_non_torch_bytes_never_counts_a_change_in_between():
    gib = 2**30
    assert non_torch_bytes(10 * gib, 9 * gib, 9 * gib) == gib
    # torch grew between the reads: the larger reservation is subtracted (a lower bound).
    assert non_torch_bytes(10 * gib, 8 * gib, 9 * gib) == gib
    assert non_torch_bytes(5 * gib, 9 * gib, 9 * gib) == 0


def test_what_a_node_cannot_run_is_known_before_launch():
    from tunelab.config import load_config
    from tunelab.devices import cpu_supports_fp16, unsupported_reason

    from .conftest import TINY

    zero0_offload = load_config(TINY, ["actor.zero_stage=0", "actor.offload_optimizer=cpu"])
    assert unsupported_reason(zero0_offload, []) is None  # the CPU accelerator runs it
    assert "CPU Adam there only with parameters in host memory" in unsupported_reason(
        zero0_offload, NVML[:1]
    )
    assert "hybrid engine" in unsupported_reason(load_config(TINY, ["hybrid_engine=true"]), [])
    fp16 = unsupported_reason(load_config(TINY, ["precision=fp16"]), [])
    assert (fp16 is None) == cpu_supports_fp16()
    assert cpu_supports_fp16("flags : fpu avx512f avx512_fp16 amx_tile")
    assert not cpu_supports_fp16("flags : fpu avx512f avx512_bf16")
