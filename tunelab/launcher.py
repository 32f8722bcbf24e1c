"""One trial as an isolated subprocess group: argv, timeout, kill, classification.

No torch here: the orchestrator stays light. The trial takes DIR/trial.json and leaves
DIR/metrics.json (rank 0), DIR/rank<N>.json (every rank), DIR/progress.jsonl and DIR/trial.log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil

from tunelab import ops
from tunelab.config import TrialConfig
from tunelab.devices import trial_cuda_env
from tunelab.records import Status
from tunelab.zygote import ForkedTrial, ZygotePool, ZygoteUnavailable, alive

Launcher = Literal["torchrun", "deepspeed"]

# "pid:create_time" of the process a trial must not outlive (read by tunelab.pipeline.run).
WATCH_ENV = "TUNELAB_WATCH_PID"
# DIR/stages.json: which stages the trial loads from or saves to the stage cache (stagecache).
STAGE_PLAN = "stages.json"

# Set by a launcher for its own children; a trial must not inherit the caller's.
_RANK_VARIABLES = frozenset(
    ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
     "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
)  # fmt: skip


# Set for every trial process. glibc serves allocations above this size with mmap and returns
# them on free; with its default adaptive threshold, freed transients (a ZeRO-3 model built
# module by module, hand-off copies) stay in the heap and a rank's resident memory never falls
# back. Measured on 2 ranks building OPT-350m for ZeRO-3 in bf16: peak rise 1009 MB without it,
# 478 MB with it (tests/helpers/partitioned_build.py).
# HF_HUB_OFFLINE: a trial loads hub models from the local cache only (config.check_inputs
# refuses one the cache lacks before launch); a download would be timed with the trial, and
# would race between workers.
TRIAL_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "HF_HUB_OFFLINE": "1"}


def cpu_threads(ranks: int, concurrent: int = 1) -> int:
    """Threads per rank (OMP_NUM_THREADS, which sizes torch's pool): the cores this process may
    use, shared by every rank of every trial running at once. OpenMP's default of all cores per
    process oversubscribes them as soon as two processes compute together, and its spinning
    threads then slow each other: a tiny trial on this 2-core machine, under load, took 79-159 s
    of trial time with 2 threads against 10-18 s with 1 (README, "Measured here")."""
    return max(1, len(os.sched_getaffinity(0)) // (ranks * concurrent))


@dataclass(frozen=True)
class TrialOutcome:
    """What the parent knows after the trial process group is gone."""

    status: Status  # tunelab.records.Status
    reason: str
    metrics: dict[str, Any]
    series: dict[str, list[float]]
    wall_s: float  # measured by the parent: process start to exit, imports included
    returncode: int | None  # None: stopped before any process was started
    out_dir: Path
    ranks: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # decoded answers, if any

    @property
    def log_path(self) -> Path:
        return self.out_dir / "trial.log"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pipeline_args(out_dir: Path) -> list[str]:
    return ["--config", str(out_dir / "trial.json"), "--out", str(out_dir)]


def trial_argv(
    config: TrialConfig, out_dir: Path, launcher: Launcher = "torchrun", gpus=None
) -> list[str]:
    """The command that runs one trial: the pipeline module directly, or through a launcher.
    `gpus` (indices) is the worker's slice; torchrun sees it through CUDA_VISIBLE_DEVICES, the
    DeepSpeed launcher (which sets that variable itself) through --include."""
    entry = pipeline_args(out_dir)
    if config.ranks == 1:
        return [sys.executable, "-m", "tunelab.pipeline", *entry]
    if launcher == "deepspeed":
        where = (
            ["--include", "localhost:" + ",".join(map(str, gpus))]
            if gpus
            else ["--num_gpus", str(config.ranks)]
        )
        return [
            sys.executable, "-m", "deepspeed.launcher.runner", *where,
            "--master_port", str(_free_port()), "--module", "tunelab.pipeline", *entry,
        ]  # fmt: skip
    # --standalone: torchrun picks a free rendezvous port itself (no race between workers).
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(config.ranks), "--module", "tunelab.pipeline", *entry,
    ]  # fmt: skip


def kill_process_tree(process: subprocess.Popen | ForkedTrial, grace_s: float = 5.0) -> list[Path]:
    """SIGTERM, then SIGKILL, the trial's process group and every descendant (a launcher may
    start workers in sessions of their own); returns once they are gone, with the op build
    locks they held and left, now removed (tunelab.ops: a trial killed while loading an op)."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    held = ops.locks_held([process.pid, *(child.pid for child in descendants)])
    try:
        _end(process, descendants, grace_s)
    finally:
        removed = ops.clear_stale_locks(killed=held)[0] if held else []
    return removed


def _end(process, descendants: list[psutil.Process], grace_s: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(sig)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + grace_s
        while any(map(alive, descendants)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not any(map(alive, descendants)):
            return
    process.wait()


def _note_removed(log, locks: list[Path]) -> None:
    for lock in locks:
        log.write(f"tunelab: removed {lock}, an op build lock the ended trial left\n".encode())
    log.flush()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _log_tail_mentions(log_path: Path, *needles: str) -> bool:
    try:
        with log_path.open("rb") as handle:
            handle.seek(max(0, log_path.stat().st_size - 65536))
            text = handle.read().decode(errors="replace").lower()
    except OSError:
        return False
    return any(needle in text for needle in needles)


# Signals another process sends to end one (the rest are crashes the process causes itself).
_KILL_SIGNALS = {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}
# What a trial's log says when an allocation failed (torch, Python, C++).
_OOM_NEEDLES = ("out of memory", "outofmemoryerror", "memoryerror", "std::bad_alloc")
_OOM_LINE = re.compile(r"(?:Killed process|oom-kill:.*\bpid=)\s*(\d+)")


def _cgroup_oom_kills() -> int | None:
    """OOM kills counted by this process's memory cgroup: `oom_kill` of cgroup v2's
    memory.events or v1's memory.oom_control (None when neither can be read)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    files = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        path = path.lstrip("/")
        if controllers == "":
            files += [Path("/sys/fs/cgroup", path, "memory.events"),
                      Path("/sys/fs/cgroup/unified", path, "memory.events")]  # fmt: skip
        elif "memory" in controllers.split(","):
            files.append(Path("/sys/fs/cgroup/memory", path, "memory.oom_control"))
    for file in files:
        with contextlib.suppress(OSError):
            for line in file.read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    return None


class OomWatch:
    """Evidence that the kernel's OOM killer ended a trial: an OOM-kill line in the kernel log
    (/dev/kmsg, read from the trial's start) naming one of its processes, or a rise of the
    memory cgroup's OOM-kill counter while it ran. Without either, a killed trial is `killed`."""

    def __init__(self) -> None:
        self.kills_before = _cgroup_oom_kills()
        self.pids: set[int] = set()
        try:
            self.kmsg: int | None = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(self.kmsg, 0, os.SEEK_END)
        except OSError:  # not readable for this user (dmesg_restrict)
            self.kmsg = None

    def watch(self, pid: int) -> None:
        """Remember the trial's processes (the kernel log names the one it killed)."""
        self.pids.add(pid)
        with contextlib.suppress(psutil.Error):
            self.pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))

    def evidence(self) -> str | None:
        if self.kmsg is not None:
            while True:
                try:
                    record = os.read(self.kmsg, 8192).decode(errors="replace")
                except BlockingIOError:
                    break
                except OSError:  # EPIPE: records overwritten meanwhile; read on
                    continue
                match = _OOM_LINE.search(record)
                if match and int(match.group(1)) in self.pids:
                    return "kernel log: " + record.split(";", 1)[-1].strip()[:160]
        after = _cgroup_oom_kills()
        if None not in (self.kills_before, after) and after > self.kills_before:
            return f"the memory cgroup counted {after - self.kills_before} OOM kill(s)"
        return None

    def close(self) -> None:
        if self.kmsg is not None:
            os.close(self.kmsg)
            self.kmsg = None


def collect_outcome(
    out_dir: Path, returncode: int | None, wall_s: float, oom_evidence: str | None = None
) -> TrialOutcome:
    """Classify a finished trial from metrics.json, the ranks' files, or how it ended: `oom`
    only with evidence (an out-of-memory error in the log, or `oom_evidence` from OomWatch),
    `killed` for a signal from outside without it."""
    result = _read_json(out_dir / "metrics.json")
    ranks = sorted(out_dir.glob("rank*.json"))
    failed_ranks = [r for r in map(_read_json, ranks) if r and r.get("status") != Status.OK]
    if result is not None and (result["status"] != Status.OK or not failed_ranks):
        status, reason = Status(result["status"]), result["reason"]
    elif failed_ranks:
        first = failed_ranks[0]
        status, reason = Status(first["status"]), f"rank {first['rank']}: {first['reason']}"
    elif returncode is not None and returncode < 0:
        sig = signal.Signals(-returncode).name
        if oom_evidence:
            status, reason = Status.OOM, f"killed by {sig} ({oom_evidence})"
        elif _log_tail_mentions(out_dir / "trial.log", *_OOM_NEEDLES):
            status, reason = Status.OOM, f"ended by {sig}; the log reports an allocation failure"
        elif -returncode not in _KILL_SIGNALS:  # SIGSEGV, SIGABRT, ...: the process crashed
            status, reason = Status.ERROR, f"trial process crashed ({sig}); see its log"
        else:
            status, reason = (
                Status.KILLED,
                f"ended by {sig} from outside tunelab (no OOM kill in the kernel log or the "
                "memory cgroup)",
            )
    else:
        exited = f"trial process exited with code {returncode}"
        if oom_evidence:
            status, reason = Status.OOM, f"{exited} ({oom_evidence})"
        elif _log_tail_mentions(out_dir / "trial.log", *_OOM_NEEDLES):
            status, reason = Status.OOM, f"{exited}; log reports OOM"
        else:
            status, reason = Status.ERROR, f"{exited} and no metrics"
    result = result or {}
    return TrialOutcome(
        status=status,
        reason=reason,
        metrics=result.get("metrics", {}),
        series=result.get("series", {}),
        wall_s=wall_s,
        returncode=returncode,
        out_dir=out_dir,
        ranks=result.get("ranks", []),
        samples=result.get("samples", []),
    )


class ProgressReader:
    """Reads new lines of the trial's progress.jsonl as they appear."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0

    def new_records(self) -> list[dict[str, Any]]:
        try:
            with self._path.open() as handle:
                handle.seek(self._offset)
                text = handle.read()
        except FileNotFoundError:
            return []
        complete = text[: text.rfind("\n") + 1]
        self._offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def trial_env(ranks: int, gpus: list[int] | None = None, concurrent: int = 1) -> dict[str, str]:
    """The environment of a trial's processes (see launch_trial)."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    env.update(TRIAL_ENV, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads(ranks, concurrent)))
    env[WATCH_ENV] = f"{os.getpid()}:{psutil.Process().create_time():.2f}"
    env.update(trial_cuda_env(gpus))
    return env


def launch_trial(
    config: TrialConfig,
    out_dir: Path,
    *,
    timeout_s: float | None = None,
    launcher: Launcher = "torchrun",
    gpus: list[int] | None = None,
    on_progress: Callable[[dict[str, Any]], bool] | None = None,
    on_start: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
    poll_s: float = 0.2,
    stage_plan: dict | None = None,
    concurrent: int = 1,
    zygotes: ZygotePool | None = None,
) -> TrialOutcome:
    """Run one trial in its own process group and wait for it.

    `stage_plan` (tunelab.stagecache.stage_plan) lets it reuse or cache SFT and RM.
    `concurrent`: trials running at once on this host, which share its cores (`cpu_threads`;
    an OMP_NUM_THREADS already set is kept).
    `on_progress` sees each progress record; returning True stops the trial (status `pruned`).
    Past `timeout_s` the whole group is killed (status `timeout`); so is it when `stop` is set
    (status `interrupted`). `on_start` gets the process group id.
    `zygotes`: a one-rank trial is forked from one of them (tunelab.zygote) when it can be.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.json", "progress.jsonl", STAGE_PLAN,
                  *(p.name for p in out_dir.glob("rank*.json"))):  # fmt: skip
        (out_dir / stale).unlink(missing_ok=True)
    (out_dir / "trial.json").write_text(json.dumps(config.to_dict(), indent=1))
    if stage_plan:
        (out_dir / STAGE_PLAN).write_text(json.dumps(stage_plan, indent=1))
    argv = trial_argv(config, out_dir, launcher, gpus)
    child_env = trial_env(config.ranks, gpus, concurrent)
    progress = ProgressReader(out_dir / "progress.jsonl")
    oom = OomWatch()
    started, started_at = time.monotonic(), time.time()
    stopped: tuple[Status, str] | None = None
    with contextlib.closing(oom), (out_dir / "trial.log").open("ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        process: subprocess.Popen | ForkedTrial | None = None
        if zygotes is not None and config.ranks == 1:
            try:
                process = zygotes.start(pipeline_args(out_dir), child_env, out_dir / "trial.log",
                                        stop)  # fmt: skip
            except ZygoteUnavailable as exc:
                if stop is not None and stop.is_set():  # stopped while a zygote imported
                    log.write(b"tunelab: stopped before the trial started\n")
                    return TrialOutcome(Status.INTERRUPTED, "the orchestrator was stopped", {},
                                        {}, time.monotonic() - started, None, out_dir)  # fmt: skip
                log.write(f"tunelab: no zygote ({exc}); a fresh process runs the trial\n".encode())
                log.flush()
        if process is None:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True
            )
        else:  # the kernel's OOM killer may pick the zygote for the trial's memory
            oom.pids.add(process.zygote.process.pid)
        if on_start is not None:
            on_start(process.pid)
        try:
            while process.poll() is None:
                oom.watch(process.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=poll_s)  # returns as soon as the trial exits
                for record in progress.new_records():  # none reported after a stop
                    if stopped is None and on_progress is not None and on_progress(record):
                        where = f"{record['stage']} step {record['step']}"
                        stopped = (Status.PRUNED, f"stopped early at {where}")
                if timeout_s is not None and time.monotonic() - started > timeout_s:
                    stopped = (Status.TIMEOUT, f"exceeded the {timeout_s:g} s trial timeout")
                if stop is not None and stop.is_set():
                    stopped = (Status.INTERRUPTED, "the orchestrator was stopped")
                if stopped is not None:
                    _note_removed(log, kill_process_tree(process))
                    break
        finally:
            if process.poll() is None:  # interrupted (Ctrl-C): leave nothing behind
                _note_removed(log, kill_process_tree(process))
        if stopped is None and process.returncode:  # it died (an OOM kill, a crash): maybe
            _note_removed(log, ops.clear_stale_locks(since=started_at)[0])  # while loading an op
        wall_s = time.monotonic() - started
        evidence = oom.evidence() if stopped is None and process.returncode else None
    outcome = collect_outcome(out_dir, process.returncode, wall_s, evidence)
    if stopped is not None:
        status, reason = stopped
        return TrialOutcome(status, reason, outcome.metrics, outcome.series, wall_s,
                            process.returncode, out_dir, samples=outcome.samples)  # fmt: skip
    return outcome
