"""A trial process ends through process_end.end_process, not the interpreter's finalization.

CI saw a rank of the ZeRO-3 generation helper abort after its results were written ("terminate
called without an active exception", SIGABRT), twice, at random. The helper below ends 2 gloo
ranks while collectives finish on a group that outlives destroy_process_group (DeepSpeed keeps
one): through the interpreter's finalization a rank aborts so in most runs on this machine
(benchmarks/process_end.py, reports/bench/process_end.md); through end_process it must not.
"""

from __future__ import annotations

from ..conftest import ROOT
from ..helpers.ranks import launch_on_ranks

HELPER = ROOT / "tests" / "helpers" / "held_group_exit.py"


def test_ranks_that_end_through_end_process_exit_cleanly_with_their_results(tmp_path):
    run = launch_on_ranks(HELPER, "end_process", str(tmp_path), timeout=120)
    output = run.stdout + run.stderr
    assert run.returncode == 0 and "terminate called" not in output, output[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.txt", "rank1.txt"]
