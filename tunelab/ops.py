"""DeepSpeed's C++ ops, compiled on first use (about a minute each on 2 cores) into torch's
extension cache: which ones trials use, which are missing from the cache, and building those
once before the first trial with a visible message, so a new user sees why the first minutes
are quiet and no trial's wall time or timeout pays for a compiler run.

    python -m tunelab.ops cpu_adam fused_adam      # what build_ops runs (imports DeepSpeed)

Stale build locks. torch takes a lock file in the op's folder (`FileBaton`) every time a
process loads the op, built or not (it asks ninja whether to rebuild, about a second), and
keeps the lock's descriptor open until it removes it. A process killed in that second (a trial
stopped, timed out or pruned while starting) leaves the lock, and every later load of the op
waits for it forever, silently. `clear_stale_locks` removes the locks that no process on this
machine holds: after the launcher kills a trial, those its processes held; after a trial died
by itself, those made since it started; before a study's first trial (and before the test
suite), every such lock. One on a network or FUSE filesystem, or another user's, may have a
holder out of sight, so the last two name it instead of removing it.

The rest of this module never imports torch (the orchestrator stays light).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

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


LOCK = "lock"  # torch.utils.cpp_extension's FileBaton in each op's build folder
# `/proc/mounts` types whose files processes of other machines may hold open; any FUSE
# filesystem counts as one too (GlusterFS, CephFS, JuiceFS, sshfs mount through FUSE).
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs",
                       "ceph", "glusterfs", "9p", "afs", "wekafs", "virtiofs")  # fmt: skip


def op_locks() -> list[Path]:
    """The build locks in the extension cache now (resolved paths)."""
    locks = []
    for folder in cache_dirs():
        with contextlib.suppress(OSError):
            locks += [op / LOCK for op in sorted(folder.iterdir()) if (op / LOCK).is_file()]
    return [lock.resolve() for lock in locks]


def _open_paths(pid: int) -> set[str]:
    """What `pid`'s descriptors point at (/proc/PID/fd links, read without touching the files:
    a stat could hang on an unreachable network mount)."""
    folder = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(folder)
    except OSError:
        return set()
    paths = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            paths.add(os.readlink(f"{folder}/{fd}"))
    return paths


def locks_held(pids: Iterable[int]) -> set[Path]:
    """The build locks that the processes `pids` hold (have open)."""
    locks = {str(lock) for lock in op_locks()}
    held: set[str] = set()
    for pid in pids if locks else ():
        held |= _open_paths(pid) & locks
    return {Path(lock) for lock in held}


def mount_type(path: Path, mounts_text: str | None = None) -> str:
    """The filesystem type of the mount `path` lies on (/proc/mounts' longest prefix)."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    best, kind = "", ""
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def on_network_filesystem(path: Path) -> bool:
    kind = mount_type(path)
    return kind in NETWORK_FILESYSTEMS or kind.startswith("fuse")


def clear_stale_locks(killed: set[Path] | None = None,
                      since: float | None = None) -> tuple[list[Path], list[Path]]:  # fmt: skip
    """Remove the build locks that no process on this machine holds: of `killed` (locks a
    trial's processes held before the launcher killed them) when given, else every one on a
    local filesystem that this user owns (made at or after `since`, epoch seconds, if given).
    Returns (removed, left: held by no process seen here, but on a network filesystem or
    another user's). A lock is removed only if it is still the file that was checked (the
    same inode), so one taken again meanwhile is kept."""
    found = {}
    for lock in killed if killed is not None else op_locks():
        with contextlib.suppress(OSError):
            found[lock] = lock.stat()
    if since is not None:
        found = {lock: st for lock, st in found.items() if st.st_mtime >= since}
    if not found:
        return [], []
    names, held = {str(lock) for lock in found}, set()
    for pid in psutil.pids():
        held |= _open_paths(pid) & names
    removed, left = [], []
    for lock, seen in found.items():
        if str(lock) in held:
            continue
        if killed is None and (seen.st_uid != os.geteuid() or on_network_filesystem(lock)):
            left.append(lock)  # a holder may be out of sight
            continue
        with contextlib.suppress(OSError):
            now = lock.stat()
            if (now.st_dev, now.st_ino) == (seen.st_dev, seen.st_ino):
                lock.unlink()
                removed.append(lock)
    return removed, left


def report_stale_locks(echo: Callable[[str], None]) -> None:
    """clear_stale_locks before trials start, saying what it found."""
    removed, left = clear_stale_locks()
    for lock in removed:
        echo(f"removed {lock}: a build lock no process holds (left by a process killed while "
             "loading that op); every load of the op would have waited for it")  # fmt: skip
    for lock in left:
        echo(f"warning: {lock} is a build lock no process on this machine holds; if no other "
             "machine or user is building that op, remove it, or every trial loading the op "
             "waits for it")  # fmt: skip


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
