"""Build locks of DeepSpeed's ops that a killed process left: found, removed, reported; held
ones kept. Processes hold torch's own FileBaton, as an op load does (tunelab.ops)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab import ops
from tunelab.launcher import kill_process_tree

# Takes the lock as torch.utils.cpp_extension._jit_compile does, then waits to be killed.
HOLD = """
import sys, time
from torch.utils.file_baton import FileBaton
assert FileBaton(sys.argv[1]).try_acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def extensions(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "torch_extensions"
    for op in ("fused_adam", "cpu_adam"):
        (folder / op).mkdir(parents=True)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(folder))
    return folder.resolve()


def hold(lock: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    assert process.stdout.readline() == "held\n"
    return process


def test_a_lock_whose_holder_was_killed_is_removed_and_a_held_one_kept(extensions):
    held, left = extensions / "fused_adam" / "lock", extensions / "cpu_adam" / "lock"
    holder, killed = hold(held), hold(left)
    try:
        killed.kill()
        killed.wait()
        assert left.exists()  # what a load would now wait for, forever
        assert ops.op_locks() == [left, held]  # sorted by op folder
        assert ops.locks_held([holder.pid, killed.pid]) == {held}
        assert ops.clear_stale_locks() == ([left], [])
        assert held.exists() and not left.exists()
        assert ops.clear_stale_locks(killed={held}) == ([], [])  # still held: kept
    finally:
        holder.kill()
        holder.wait()
    assert ops.clear_stale_locks(killed={held}) == ([held], [])


def test_killing_a_trial_removes_the_locks_it_held(extensions):
    lock = extensions / "fused_adam" / "lock"
    trial = hold(lock)
    assert kill_process_tree(trial, grace_s=5) == [lock]
    assert trial.returncode == -signal.SIGTERM
    assert not lock.exists()


def test_on_a_network_filesystem_a_lock_is_named_not_removed(extensions, monkeypatch):
    lock = extensions / "cpu_adam" / "lock"
    lock.touch()  # no process holds it here; one of another node might
    monkeypatch.setattr(ops, "mount_type", lambda path: "nfs4")
    seen: list[str] = []
    ops.report_stale_locks(seen.append)
    assert lock.exists()
    assert seen == [f"warning: {lock} is a build lock no process on this machine holds; if no "
                    "other machine or user is building that op, remove it, or every trial "
                    "loading the op waits for it"]  # fmt: skip
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    seen.clear()
    ops.report_stale_locks(seen.append)
    assert not lock.exists() and seen[0].startswith(f"removed {lock}: a build lock no process")


def test_a_lock_taken_again_after_the_check_is_kept(extensions, monkeypatch):
    """A lock that a new load takes between the scan of holders and the removal is another
    file (another inode) by then: it is kept, and a later scan sees its holder."""
    stale = extensions / "cpu_adam" / "lock"
    stale.touch()
    scan = ops._open_paths

    def scan_then_retake(pid):
        if stale.exists() and stale.stat().st_ino == inode:
            # Released and taken again by another load: a new file in its place (made before
            # the old one goes, so it cannot get the freed inode number).
            stale.with_name("taken").touch()
            stale.with_name("taken").rename(stale)
        return scan(pid)

    inode = stale.stat().st_ino
    monkeypatch.setattr(ops, "_open_paths", scan_then_retake)
    assert ops.clear_stale_locks() == ([], [])
    assert stale.exists() and stale.stat().st_ino != inode


def test_only_locks_made_since_a_trial_started_and_this_users_are_removed(extensions):
    old, other, new = (extensions / op / "lock" for op in ("fused_adam", "cpu_adam", "x"))
    new.parent.mkdir()
    for lock in (old, other, new):
        lock.touch()
    os.utime(old, (1, 1))  # before the trial
    os.chown(other, 12345, -1)  # another user's: a holder may be out of sight
    assert ops.clear_stale_locks(since=2.0) == ([new], [other])
    assert old.exists() and other.exists()


def test_mount_type_takes_the_longest_mount_point():
    mounts = ("/dev/vda / ext4 rw 0 0\nserver:/home /home nfs4 rw 0 0\n"
              "tmpfs /home/me/fast\\040disk tmpfs rw 0 0\n"
              "gluster:/v /mnt/g fuse.glusterfs rw 0 0\n")  # fmt: skip
    assert ops.mount_type(Path("/home/me/.cache"), mounts) == "nfs4"
    assert ops.mount_type(Path("/home/me/fast disk/x"), mounts) == "tmpfs"
    assert ops.mount_type(Path("/homework/x"), mounts) == "ext4"
    assert ops.mount_type(Path(os.sep), mounts) == "ext4"
    assert ops.mount_type(Path("/mnt/g/cache"), mounts) == "fuse.glusterfs"


def test_fuse_and_network_mounts_count_as_shared(monkeypatch):
    for kind, shared in (("nfs4", True), ("fuse.glusterfs", True), ("fuseblk", True),
                         ("lustre", True), ("ext4", False), ("overlay", False)):  # fmt: skip
        monkeypatch.setattr(ops, "mount_type", lambda path, kind=kind: kind)
        assert ops.on_network_filesystem(Path("/x")) == shared, kind
