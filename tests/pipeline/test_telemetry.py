"""The host peak a trial reports is its own process's."""

from __future__ import annotations

import subprocess
import sys

from tunelab.pipeline.telemetry import peak_rss_bytes

from ..conftest import ROOT

GIB = 1 << 30
# A launcher holding 1 GiB starts a process that imports tunelab's telemetry (and torch), as
# the orchestrator (or pytest) starts a trial; the child prints VmHWM and ru_maxrss.
LAUNCHER = """
import subprocess, sys
held = bytearray(1 << 30)
held[::4096] = b"x" * (len(held) // 4096)  # touch every page
child = ("import resource; from tunelab.pipeline.telemetry import peak_rss_bytes; "
         "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                     check=True).stdout)
"""


def test_vmhwm_is_read_from_proc_status():
    status = "Name:\tpython\nVmPeak:\t 900 kB\nVmHWM:\t  531636 kB\nVmRSS:\t 1 kB\n"
    assert peak_rss_bytes(status) == 531636 * 1024
    assert peak_rss_bytes() > 0


def test_a_trial_process_reports_its_own_peak_not_its_launchers():
    run = subprocess.run([sys.executable, "-c", LAUNCHER], capture_output=True, text=True,
                         cwd=ROOT, check=True)  # fmt: skip
    peak, maxrss = map(int, run.stdout.split())
    assert maxrss >= GIB  # ru_maxrss: Linux carries the launcher's peak across exec
    assert peak < 0.8 * GIB  # the child's own: torch and tunelab imported
