"""Single-rank trials forked from a process that has imported torch and its company once
(tunelab.pipeline.zygote, which says what makes a fork equal to a fresh start).

No torch here. A `ZygotePool` keeps one idle zygote per trial environment; `start` hands a
trial to one and returns a `ForkedTrial`, which answers as `subprocess.Popen` does (pid,
poll, wait, returncode), so tunelab.launcher runs, times, stops and classifies it as any other
trial. Where no zygote can be had (it failed to start, or the pool was stopped), `start`
returns None and the launcher starts a fresh process.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

READY_TIMEOUT_S = 300.0  # a zygote importing on a loaded machine (a fresh trial has no cap)


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def environment_key(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(env.items()))


class Zygote:
    """One zygote process and the JSON lines it answers on its stdout."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.key = environment_key(env)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tunelab.pipeline.zygote"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=dict(env), start_new_session=True,  # Ctrl-C reaches the orchestrator only
        )  # fmt: skip
        self._pending = b""
        self.preloaded: list[str] | None = None

    def read(self, timeout_s: float | None) -> dict[str, Any] | None:
        """The next message, None when none came within `timeout_s`; EOFError when the
        zygote is gone."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        stream = self.process.stdout.fileno()
        while b"\n" not in self._pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([stream], [], [], left)[0]:
                return None
            chunk = os.read(stream, 65536)
            if not chunk:
                raise EOFError("the zygote ended")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def wait_ready(self, stop: threading.Event | None) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self.preloaded is None and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return False
            try:
                message = self.read(0.2)
            except EOFError:
                return False
            if message is not None:
                self.preloaded = message["ready"]
        return self.preloaded is not None

    def fork(self, args: list[str], log: Path) -> int:
        """Start a trial; its pid once it runs in its own session."""
        self.process.stdin.write((json.dumps({"args": args, "log": str(log)}) + "\n").encode())
        self.process.stdin.flush()
        message = self.read(None)
        return message["pid"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # the zygote ends at the end of its input
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


class ForkedTrial:
    """A trial forked by `zygote`, as far as tunelab.launcher asks a subprocess.Popen."""

    def __init__(self, zygote: Zygote, pid: int, args: list[str], pool: ZygotePool) -> None:
        self.zygote, self.pid, self.args, self._pool = zygote, pid, args, pool
        self.returncode: int | None = None

    def _collect(self, timeout_s: float | None) -> int | None:
        if self.returncode is None:
            try:
                message = self.zygote.read(timeout_s)
            except EOFError:  # the zygote died; the kernel kills the child bound to it
                self._pool.discard(self.zygote)
                with contextlib.suppress(psutil.NoSuchProcess):
                    child = psutil.Process(self.pid)
                    while alive(child):
                        time.sleep(0.01)
                self.returncode = -signal.SIGKILL
                return self.returncode
            if message is not None:
                self.returncode = message["exit"]
                self._pool.put_back(self.zygote)
        return self.returncode

    def poll(self) -> int | None:
        return self._collect(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._collect(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return code


class ZygotePool:
    """Idle zygotes by the environment their trials get; the launcher takes one per trial."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple, list[Zygote]] = {}
        self._all: list[Zygote] = []
        self._failed: set[tuple] = set()  # environments whose zygote did not start
        self._closed = False

    def start(self, args: list[str], env: Mapping[str, str], log: Path,
              stop: threading.Event | None = None) -> ForkedTrial | None:  # fmt: skip
        """Fork a trial with `args` (tunelab.pipeline's), output appended to `log`; None
        when no zygote is ready for this environment."""
        key = environment_key(env)
        with self._lock:
            if self._closed or key in self._failed:
                return None
            idle = self._idle.setdefault(key, [])
            zygote = idle.pop() if idle else None
            if zygote is None:
                zygote = Zygote(env)
                self._all.append(zygote)
        if not zygote.wait_ready(stop):
            with self._lock:
                if not (stop is not None and stop.is_set()):
                    self._failed.add(key)
            self.discard(zygote)
            return None
        try:
            pid = zygote.fork(args, log)
        except (OSError, EOFError, ValueError):
            self.discard(zygote)
            return None
        return ForkedTrial(zygote, pid, args, self)

    def put_back(self, zygote: Zygote) -> None:
        with self._lock:
            if not self._closed:
                self._idle[zygote.key].append(zygote)
                return
        self.discard(zygote)

    def discard(self, zygote: Zygote) -> None:
        with self._lock:
            if zygote in self._all:
                self._all.remove(zygote)
        zygote.close()

    def close(self) -> None:
        """End every zygote (a trial still running keeps its own until it ends)."""
        with self._lock:
            self._closed = True
            idle = [z for zygotes in self._idle.values() for z in zygotes]
            self._idle.clear()
        for zygote in idle:
            self.discard(zygote)
