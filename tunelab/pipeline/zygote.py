"""A process that imports what every trial imports once, then forks one trial at a time.

`python -m tunelab.pipeline.zygote`, started by tunelab.zygote with the environment a trial
gets. A tiny trial spends a fifth to a third of its wall time importing torch, transformers,
peft and DeepSpeed (reports/bench/trial_wall.md); a forked child starts with them loaded. The
child is a process of its own (own session, memory and exit status), as isolated as a fresh
one.

What makes a fork equal to a fresh start:
- CUDA. A child can use CUDA only if its parent never started the driver. DeepSpeed's import
  asks `torch.cuda.is_available()`, which starts it, so DeepSpeed is preloaded only where no
  NVIDIA device file exists. A zygote that finds the driver library mapped after its imports
  (`cuda_driver_mapped`) says so instead of serving, and its trials start fresh.
- Host memory. A fresh process counts the library pages its imports touched in its resident
  set; a forked child would not, until it touches them again, so its `mem/peak_host_rss_bytes`
  would read lower. The child maps the pages resident in the zygote before the trial starts
  (`resident_file_runs`, `touch_pages`); heap pages are inherited and counted already.
- State. Nothing runs in the zygote but the imports: no torch op (no thread pool, no use of
  torch's generator), no logging set-up. The garbage collector stays off through the imports,
  as in tunelab.pipeline's entry point, which then collects once and freezes what is left
  (startup.freeze_imported_objects); the zygote does that once for all its children, whose own
  call then walks only what they made (walking the inherited heap took 1.4 s a child, and
  copied every page that holds an object). Python reseeds `random` at a fork and the child reseeds
  numpy's global generator, as a fresh process draws both from the OS. Children share the
  zygote's string-hash seed (PYTHONHASHSEED), which only orders sets of strings.
- Exit. The child leaves as a fresh trial process does (process_end.end_process: streams
  flushed, no finalization), never back into the zygote's loop.

Protocol (JSON lines): the zygote writes {"ready": [modules], "unusable": reason or null} once
(and ends when unusable); each request on stdin, {"args": [...], "log": path}, gets
{"pid": N} once the child runs in its own session, then {"exit": code} (negative: killed by
that signal) when it ends.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tunelab.pipeline.process_end import end_process

PRELOAD = ("torch", "transformers.models.opt.modeling_opt", "transformers.generation", "peft")
# Imported by every trial's first ZeRO or bf16 optimizer (0.76 s, trial_wall.md); DeepSpeed's
# import probes CUDA, so these only where no GPU can be seen.
PRELOAD_WITHOUT_GPU = ("deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_PR_SET_PDEATHSIG = 1
_PRESENT = 1 << 63  # /proc/PID/pagemap: the page is in this process's page table


def preload_modules(gpu_visible: bool) -> tuple[str, ...]:
    return PRELOAD if gpu_visible else PRELOAD + PRELOAD_WITHOUT_GPU


def cuda_driver_mapped(maps_text: str) -> bool:
    """Whether the CUDA driver library is loaded (/proc/self/maps): the runtime loads it when
    it starts, and a forked child of a process that did so cannot use CUDA."""
    return any("libcuda.so" in line for line in maps_text.splitlines())


def file_mappings(maps_text: str) -> list[tuple[int, int]]:
    """(start, end) of the readable mappings of files (/proc/self/maps); devices, /proc, /sys
    and the kernel's pseudo-files ([vdso], [heap], ...) left out."""
    spans = []
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/"):
            continue
        if fields[5].startswith(("/dev/", "/proc/", "/sys/")):
            continue
        if not fields[1].startswith("r"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        spans.append((start, end))
    return spans


def present_runs(start: int, entries: bytes) -> list[tuple[int, int]]:
    """(address, pages) runs of present pages among the 8-byte pagemap entries from `start`."""
    runs: list[tuple[int, int]] = []
    count = len(entries) // 8
    for index, entry in enumerate(memoryview(entries).cast("Q")[:count]):
        if not entry & _PRESENT:
            continue
        address = start + index * _PAGE
        if runs and runs[-1][0] + runs[-1][1] * _PAGE == address:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((address, 1))
    return runs


def resident_file_runs() -> list[tuple[int, int]]:
    """Runs of this process's file-backed pages that are in its page table now."""
    runs: list[tuple[int, int]] = []
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for start, end in file_mappings(Path("/proc/self/maps").read_text()):
            pagemap.seek(start // _PAGE * 8)
            runs += present_runs(start, pagemap.read((end - start) // _PAGE * 8))
    return runs


def touch_pages(runs: list[tuple[int, int]]) -> None:
    """Read one byte of every page in `runs`, which maps it into this process (a minor fault:
    the page is in the page cache already)."""
    for address, pages in runs:
        for page in range(pages):
            ctypes.c_char.from_address(address + page * _PAGE).value  # noqa: B018


def _child(request: dict, preloaded: tuple[str, ...], runs, started: float) -> int:
    """In the forked child: become the trial process; returns its exit code."""
    fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the zygote's requests
    os.close(null)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    touch_pages(runs)
    print(f"tunelab zygote: forked from pid {os.getppid()}, {', '.join(preloaded)} imported "
          f"there, {gc.get_freeze_count()} objects frozen",
          file=sys.stderr, flush=True)  # fmt: skip
    from tunelab.pipeline.run import main

    sys.argv = ["tunelab.pipeline", *request["args"]]
    try:
        return main(request["args"], process_started=started, forked=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1


def _fork(request: dict, served: Served) -> None:
    session_read, session_write = os.pipe()
    started = time.time()
    zygote = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(session_read)
            os.close(served.replies)
            # Ends with the zygote: the orchestrator, which reads its exit status from the
            # zygote, then knows it is gone.
            served.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != zygote:  # it died before prctl
                os._exit(1)
            os.setsid()  # its own process group: the launcher ends a trial with killpg
            os.close(session_write)  # the zygote waits for this: no kill before setsid
            code = _child(request, served.preloaded, served.runs, started)
        except BaseException:
            traceback.print_exc()
        end_process(code)  # never back into the zygote's loop
    os.close(session_write)
    os.read(session_read, 1)  # EOF once the child has its own session
    os.close(session_read)
    _reply(served.replies, {"pid": pid})
    _, status = os.waitpid(pid, 0)
    _reply(served.replies, {"exit": os.waitstatus_to_exitcode(status)})


def _reply(replies: int, message: dict) -> None:
    os.write(replies, (json.dumps(message) + "\n").encode())


@dataclass(frozen=True)
class Served:
    """What every fork needs from the zygote."""

    replies: int  # the reply pipe's descriptor
    preloaded: tuple[str, ...]
    runs: list[tuple[int, int]]  # resident file pages after the imports
    prctl: object  # libc's prctl, looked up before forking


def main() -> None:
    replies = os.dup(1)
    os.dup2(2, 1)  # what the imports print must not reach the protocol
    gc.disable()  # as tunelab.pipeline's entry point; the child re-enables it
    from tunelab.devices import cuda_device_files

    preloaded = preload_modules(gpu_visible=cuda_device_files())
    for module in preloaded:
        __import__(module)
    gc.collect()  # see "State" above
    gc.freeze()
    unusable, runs = None, []
    if cuda_driver_mapped(Path("/proc/self/maps").read_text()):
        unusable = "the imports loaded the CUDA driver, so a forked child could not use CUDA"
    else:
        try:
            runs = resident_file_runs()
        except OSError as exc:
            unusable = f"cannot read /proc/self/pagemap ({exc}) to count library pages"
    _reply(replies, {"ready": list(preloaded), "unusable": unusable})
    if unusable:
        return
    served = Served(replies, preloaded, runs, ctypes.CDLL(None, use_errno=True).prctl)
    for line in sys.stdin:  # ends when the orchestrator closes it (or is gone)
        if line.strip():
            _fork(json.loads(line), served)


if __name__ == "__main__":
    main()
