"""Start-up costs a trial process need not pay (measured in reports/bench/trial_wall.md).

Two costs of the tiny trial's set-up are outside DeepSpeed's and torch's real work:
- DeepSpeed's op builders ask py-cpuinfo for the CPU's architecture and SIMD width every time
  an op loads (the CPU accelerator's Adam, ZeRO-Offload's CPU Adam), and py-cpuinfo answers by
  running a Python subprocess: about 1.1 s a question, twice per trial process. The answer is a
  property of the machine, so it is kept in a small file keyed by the CPU's description.
- DeepSpeed's optimizers (`see_memory_usage(force=True)`) and tunelab's memory release call
  `gc.collect()`, which walks every object the imports made (about 0.3 s a call). Those
  objects live as long as the process; `gc.freeze()` takes them out of the collector's walk.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import os
import platform
from pathlib import Path

from tunelab._files import write_atomic

CPU_INFO_ENV = "TUNELAB_CPU_INFO_CACHE"  # a folder; default ~/.cache/tunelab


def freeze_imported_objects() -> None:
    """Leave what exists now (imported modules, their tables) out of every later collection,
    and collect again from here on (tunelab.pipeline's entry point imports with it off)."""
    gc.collect()
    gc.freeze()
    gc.enable()


def cpu_description(cpuinfo_text: str | None = None) -> str:
    """What identifies this machine's CPU for py-cpuinfo: architecture, model and feature flags
    (the first processor's lines of /proc/cpuinfo; clock speeds, which change, left out)."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo_text = ""
    first = cpuinfo_text.split("\n\n", 1)[0]
    wanted = ("vendor_id", "model name", "flags", "features", "isa", "cpu family", "model\t",
              "cpu implementer", "cpu part")  # x86, and aarch64's "Features", "CPU part"
    kept = [line for line in first.splitlines() if line.lower().startswith(wanted)]
    return "\n".join([platform.machine(), *kept])


def cpu_info_cache_file(folder: Path | None = None, description: str | None = None) -> Path:
    folder = folder or Path(
        os.environ.get(CPU_INFO_ENV)
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunelab"
    )
    key = hashlib.sha256((description or cpu_description()).encode()).hexdigest()[:16]
    return folder / f"cpuinfo-{key}.json"


def remember_cpu_info(path: Path | None = None) -> None:
    """Make py-cpuinfo's `get_cpu_info` answer from `path` (written on first use, atomically);
    DeepSpeed imports the function at each call, so replacing the module's attribute is seen.
    An unwritable cache still answers from memory after the first probe in this process."""
    import cpuinfo

    probe = cpuinfo.get_cpu_info
    path = path or cpu_info_cache_file()

    @functools.cache
    def get_cpu_info() -> dict:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text())
        info = probe()
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(info))  # a concurrent reader sees all of it or none
        return info

    cpuinfo.get_cpu_info = get_cpu_info
