"""The trial process's start-up savings keep DeepSpeed's answers and the collector's work."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import cpuinfo
import pytest

from tunelab.pipeline import startup

PROC_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R)
cpu MHz\t\t: 2000.000
flags\t\t: fpu avx2 avx512f

processor\t: 1
cpu MHz\t\t: 2999.000
"""


def test_the_cpu_description_leaves_out_clock_speeds_and_later_processors():
    described = startup.cpu_description(PROC_CPUINFO)
    assert "avx512f" in described and "Xeon" in described and "model\t\t: 85" in described
    assert "MHz" not in described and "processor\t: 1" not in described
    faster = PROC_CPUINFO.replace("2000.000", "3100.000")
    assert startup.cpu_info_cache_file(None, startup.cpu_description(faster)) == (
        startup.cpu_info_cache_file(None, described)
    )


@pytest.fixture
def restore_cpuinfo():
    probe = cpuinfo.get_cpu_info
    yield
    cpuinfo.get_cpu_info = probe


def test_deepspeed_reads_the_remembered_cpu_answer_and_probes_once(tmp_path, restore_cpuinfo):
    """The first process probes and writes the file; a later one answers DeepSpeed's op builder
    from the file (its flags decide the SIMD width the op is compiled for) without probing."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().get_op_builder("CPUAdamBuilder")  # what the CPU Adam loads

    path = tmp_path / "cpu.json"
    startup.remember_cpu_info(path)
    arch = builder().cpu_arch()
    written = json.loads(path.read_text())
    assert written["arch"] == cpuinfo.cpuinfo.get_cpu_info()["arch"]  # the real probe's answer
    assert arch == ("-mcpu=native" if written["arch"].startswith("PPC_") else "-march=native")

    written["flags"] = ["avx512f"]  # what a later process reads is what DeepSpeed uses
    path.write_text(json.dumps(written))
    probes = []
    cpuinfo.get_cpu_info = lambda: probes.append(1) or {}
    startup.remember_cpu_info(path)
    if written["arch"] == "X86_64":
        assert builder().simd_width() == "-D__AVX512__"
    assert cpuinfo.get_cpu_info()["flags"] == ["avx512f"] and probes == []


def test_an_unwritable_cache_still_answers(tmp_path, restore_cpuinfo):
    (tmp_path / "file").write_text("")
    cpuinfo.get_cpu_info = lambda: {"arch": "X86_64", "flags": []}
    startup.remember_cpu_info(tmp_path / "file" / "cpu.json")  # its folder is a file
    assert cpuinfo.get_cpu_info() == {"arch": "X86_64", "flags": []}


def test_the_entry_point_collects_again_once_imports_are_frozen():
    code = (
        "import gc, runpy, sys\n"
        "import tunelab.pipeline.run as run\n"
        "seen = {}\n"
        "def fake_main(process_started):\n"
        "    seen['during_imports'] = gc.isenabled()\n"
        "    run.freeze_imported_objects()\n"
        "    seen['after'] = gc.isenabled(); seen['frozen'] = gc.get_freeze_count() > 0\n"
        "    print(seen); return 0\n"
        "gc.enable(); run.main = fake_main\n"
        "try:\n"
        "    runpy.run_module('tunelab.pipeline', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seen = out.stdout.strip().splitlines()[-1]
    assert seen == "{'during_imports': False, 'after': True, 'frozen': True}"
    assert gc.isenabled()
