"""The GPU acceptance script's preparation, checked on the CPU (its run needs a GPU; its dry run
on CPU stand-ins takes minutes and downloads wheels, so it is run by hand, not here)."""

from __future__ import annotations

import importlib.util
import sys
import zipfile

import pytest

from .conftest import ROOT

_spec = importlib.util.spec_from_file_location(
    "gpu_acceptance", ROOT / "benchmarks" / "gpu_acceptance.py"
)
acceptance = importlib.util.module_from_spec(_spec)
sys.modules["gpu_acceptance"] = acceptance  # dataclasses look their module up
_spec.loader.exec_module(acceptance)


@pytest.mark.parametrize("cpu", [False, True])
def test_every_step_is_a_valid_trial_and_study(cpu, tmp_path):
    steps = acceptance.plan(cpu)
    assert [step.name for step, _ in steps] == [
        "dschat-1.3b-fp16", "bf16-zero2", "bf16-zero3-offload"]  # fmt: skip
    assert acceptance.study_spec(cpu, tmp_path).is_file()


def test_device_command_fits_one_device_call():
    assert len(acceptance.DEVICE_COMMAND) < 2000
    assert "benchmarks/gpu_acceptance.py run" in acceptance.DEVICE_COMMAND


def _wheel(folder, name, version, *requires):
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_wheel_closure_finds_what_the_device_lacks(tmp_path):
    wheels = [
        _wheel(tmp_path, "app", "1.0", "lib>=2", "torch>=2.0", "missing",
               "winonly; sys_platform == 'win32'", "extra-only; extra == 'x'"),
        _wheel(tmp_path, "lib", "1.5"),
    ]
    problems = acceptance.unmet_requirements(wheels, {"torch": "2.11.0"})
    assert problems == ["app needs lib>=2: lib 1.5 there",
                        "app needs missing: not carried, not on the device"]  # fmt: skip
    assert acceptance.unmet_requirements([*wheels, _wheel(tmp_path, "lib", "2.0")], {}) == [
        "two wheels of lib: keep one"]  # fmt: skip


def test_memory_lines_compare_each_stage():
    metrics = {
        "mem/sft/peak_device_allocated_bytes": 100, "mem/sft/predicted_device_peak_bytes": 108,
        "mem/rm/peak_device_allocated_bytes": 100, "mem/rm/predicted_device_peak_bytes": 80,
        "mem/peak_device_allocated_bytes": 100,
    }  # fmt: skip
    lines = acceptance.memory_lines("t", metrics)
    assert [ok for ok, _ in lines] == [False, True]  # rm -20%, sft +8%
    assert "(-20.0%)" in lines[0][1]


def test_decoding_probe_passes_on_the_cpu_stand_in():
    """The probe the GPU run ends with, on its CPU shape: same tokens, both times reported."""
    results = acceptance.Results()
    acceptance.probe_decoding(results, on_gpu=False)
    assert results.lines[0].startswith("PASS decoding"), results.trials["decoding_probe"]
    assert results.lines[1].startswith("INFO decoding")
    assert results.trials["decoding_probe"]["decode_s"] > 0
