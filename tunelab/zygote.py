"""One-rank trials forked from a process that has imported torch and its company once
(tunelab.pipeline.zygote, which says what makes a fork equal to a fresh start).

No torch here. A `ZygotePool` keeps zygotes by trial environment, one per trial of that
environment running at once; `start` hands a trial to an idle one (started when there is
none) and returns a `ForkedTrial`, which answers as `subprocess.Popen` does (pid, poll, wait,
returncode), so tunelab.launcher runs, times, stops and classifies it as any other trial.
Where no zygote can serve (it failed to start, its imports loaded the CUDA driver, the pool is
closed), `start` raises ZygoteUnavailable with the reason, and the launcher starts a fresh
process and says why in the trial's log.
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
REPLY_TIMEOUT_S = 60.0  # from a request to the forked child's pid


class ZygoteUnavailable(Exception):
    """No zygote can serve this trial; the message says why. `lasting`: none will serve its
    environment (not so when the study is stopping or the pool closed)."""

    def __init__(self, reason: str, lasting: bool = True) -> None:
        super().__init__(reason)
        self.lasting = lasting


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

    def __init__(self, env: Mapping[str, str], log: Path | None) -> None:
        self.key = environment_key(env)
        self.log = log
        with open(log, "ab") if log else open(os.devnull, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tunelab.pipeline.zygote"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                env=dict(env), start_new_session=True,  # Ctrl-C reaches the orchestrator only
            )  # fmt: skip
        self._pending = b""
        self.preloaded: list[str] | None = None
        self.serving = False

    def read(self, timeout_s: float | None) -> dict[str, Any] | None:
        """The next message, None when none came within `timeout_s`; EOFError when the
        zygote is gone."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        stream = self.process.stdout.fileno()
        poller = select.poll()
        poller.register(stream, select.POLLIN)
        while b"\n" not in self._pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not poller.poll(None if left is None else left * 1000):
                return None
            chunk = os.read(stream, 65536)
            if not chunk:
                raise EOFError("the zygote ended")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def wait_ready(self, stop: threading.Event | None) -> None:
        """Until the zygote has imported; ZygoteUnavailable if it cannot serve."""
        where = f" (its output: {self.log})" if self.log else ""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self.preloaded is None:
            if stop is not None and stop.is_set():
                raise ZygoteUnavailable("the study is stopping", lasting=False)
            if time.monotonic() > deadline:
                raise ZygoteUnavailable(f"not ready after {READY_TIMEOUT_S:g} s{where}")
            try:
                message = self.read(0.2)
            except EOFError:
                raise ZygoteUnavailable(f"it ended while importing{where}") from None
            if message is not None:
                if message["unusable"]:
                    raise ZygoteUnavailable(message["unusable"])
                self.preloaded = message["ready"]

    def fork(self, args: list[str], log: Path) -> int:
        """Start a trial; its pid once it runs in its own session."""
        try:
            request = json.dumps({"args": args, "log": str(log)}) + "\n"
            self.process.stdin.write(request.encode())
            self.process.stdin.flush()
            message = self.read(REPLY_TIMEOUT_S)
        except (OSError, EOFError) as exc:
            raise ZygoteUnavailable(f"it ended at a fork ({exc})") from None
        if message is None:
            raise ZygoteUnavailable(f"no child after {REPLY_TIMEOUT_S:g} s")
        return message["pid"]

    def close(self) -> None:
        """End the zygote (at the end of its input once idle; killed while importing)."""
        if self.preloaded is None:
            self.process.kill()
        with contextlib.suppress(OSError):
            self.process.stdin.close()
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
        if self.returncode is not None:
            return self.returncode
        try:
            message = self.zygote.read(timeout_s)
        except (EOFError, OSError, ValueError):
            # The zygote died, and the kernel kills the child bound to it (PDEATHSIG); its
            # own children too, here.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(psutil.NoSuchProcess):
                child, deadline = psutil.Process(self.pid), time.monotonic() + 10
                while alive(child) and time.monotonic() < deadline:
                    time.sleep(0.01)
            self.returncode = -signal.SIGKILL
            self._pool.discard(self.zygote)
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
    """Zygotes by the environment their trials get; the launcher takes one per trial.

    `log`: the zygotes' own output (their imports' warnings, a failure). `limit`: at most this
    many zygotes (the trials run at once); idle ones of other environments make way.
    """

    def __init__(self, log: Path | None = None, limit: int | None = None) -> None:
        self.log, self.limit = log, limit
        self._lock = threading.Lock()
        self._all: list[Zygote] = []
        self._unusable: dict[tuple, str] = {}  # environment -> why no zygote serves it
        self._closed = False

    def start(self, args: list[str], env: Mapping[str, str], log: Path,
              stop: threading.Event | None = None) -> ForkedTrial:  # fmt: skip
        """Fork a trial with `args` (tunelab.pipeline's), its output appended to `log`."""
        key = environment_key(env)
        evicted = []
        with self._lock:
            if self._closed:
                raise ZygoteUnavailable("the pool is closed", lasting=False)
            if key in self._unusable:
                raise ZygoteUnavailable(self._unusable[key])
            idle = [z for z in self._all if z.key == key and not z.serving]
            if idle:
                zygote = idle[0]
            else:
                while self.limit and len(self._all) >= self.limit:
                    spare = next((z for z in self._all if not z.serving), None)
                    if spare is None:
                        break
                    self._all.remove(spare)
                    evicted.append(spare)
                try:
                    zygote = Zygote(env, self.log)
                except OSError as exc:
                    raise ZygoteUnavailable(f"cannot start one ({exc})") from None
                self._all.append(zygote)
            zygote.serving = True
        for spare in evicted:
            spare.close()
        try:
            zygote.wait_ready(stop)
            with self._lock:
                if self._closed:
                    raise ZygoteUnavailable("the pool is closed", lasting=False)
            pid = zygote.fork(args, log)
        except BaseException as exc:  # Ctrl-C too: leave no zygote importing behind
            if isinstance(exc, ZygoteUnavailable) and exc.lasting:
                with self._lock:
                    self._unusable[key] = str(exc)
            self.discard(zygote)
            raise
        return ForkedTrial(zygote, pid, args, self)

    def put_back(self, zygote: Zygote) -> None:
        with self._lock:
            zygote.serving = False
            if not self._closed:
                return
        self.discard(zygote)

    def discard(self, zygote: Zygote) -> None:
        with self._lock:
            if zygote in self._all:
                self._all.remove(zygote)
        zygote.close()

    def close(self) -> None:
        """End every zygote not serving a trial (one serving ends when its trial does)."""
        with self._lock:
            self._closed = True
            spare = [z for z in self._all if not z.serving]
        for zygote in spare:
            self.discard(zygote)
