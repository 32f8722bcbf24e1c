"""DeepSpeed's C++ ops, compiled on first use (about a minute each on 2 cores) into torch's
extension cache: which ones trials use, which are missing from the cache, and building those
once before the first trial with a visible message, so a new user sees why the first minutes
are quiet and no trial's wall time or timeout pays for a compiler run.

    python -m tunelab.ops cpu_adam fused_adam      # what build_ops runs (imports DeepSpeed)

The rest of this module never imports torch (the orchestrator stays light).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

# Op name (its cache folder and .so) -> DeepSpeed op builder class.
BUILDERS = {
    "deepspeed_shm_comm": "ShareMemCommBuilder",  # collectives of DeepSpeed's CPU accelerator
    "fused_adam": "FusedAdamBuilder",  # Adam without optimizer offload
    "cpu_adam": "CPUAdamBuilder",  # Adam with optimizer offload (ZeRO-Offload)
}


def needed_ops(offloads: Iterable[str], on_gpu: bool) -> list[str]:
    """The ops trials build, given the optimizer-offload values their engines may take."""
    offloads = set(offloads)
    names = [] if on_gpu else ["deepspeed_shm_comm"]
    if "none" in offloads:
        names.append("fused_adam")
    if "cpu" in offloads:
        names.append("cpu_adam")
    return names


def cache_dirs() -> list[Path]:
    """Where torch keeps built extensions (torch.utils.cpp_extension._get_build_directory):
    $TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/py<version>_<accelerator>."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return [Path(os.environ["TORCH_EXTENSIONS_DIR"])]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    version = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return sorted((cache / "torch_extensions").glob(f"{version}_*"))


def missing_ops(names: Iterable[str]) -> list[str]:
    """The ops of `names` that no extension cache folder holds yet."""
    folders = cache_dirs()
    return [n for n in names if not any((f / n / f"{n}.so").is_file() for f in folders)]


def build_ops(names: list[str], log_path: Path, echo: Callable[[str], None]) -> bool:
    """Build `names` in a child process (output in `log_path`), saying so before and after;
    False when the build failed (the trials then report the op's error themselves)."""
    echo(f"building DeepSpeed's C++ ops {', '.join(names)} once (~60 s each; cached for "
         f"every later trial; log {log_path}) ...")  # fmt: skip
    started = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        code = subprocess.run([sys.executable, "-m", "tunelab.ops", *names], stdout=log,
                              stderr=subprocess.STDOUT).returncode  # fmt: skip
    took = time.monotonic() - started
    if code == 0:
        echo(f"built DeepSpeed's ops in {took:.0f} s")
    else:
        echo(f"building DeepSpeed's ops failed after {took:.0f} s (see {log_path})")
    return code == 0


def _build(names: list[str]) -> None:
    from deepspeed.accelerator import get_accelerator

    for name in names:
        builder = get_accelerator().create_op_builder(BUILDERS[name])
        if builder is not None and builder.is_compatible(verbose=False):
            builder.load(verbose=False)


if __name__ == "__main__":
    _build(sys.argv[1:])
