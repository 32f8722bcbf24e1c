"""A trial process ends through process_end.end_process, not the interpreter's finalization.

CI saw a rank of the ZeRO-3 generation helper abort after its results were written ("terminate
called without an active exception", SIGABRT), twice, at random. The helper below makes the
cause happen every time: gloo's run-loop threads of a group that
outlives destroy_process_group (DeepSpeed keeps one) free a finished collective's tensors while
the interpreter finalizes.
"""

from __future__ import annotations

import pytest

from ..conftest import ROOT
from ..helpers.ranks import launch_on_ranks

HELPER = ROOT / "tests" / "helpers" / "held_group_exit.py"
ABORT = "terminate called without an active exception"


@pytest.mark.parametrize("how", ["interpreter", "end_process"])
def test_a_rank_ends_cleanly_only_without_finalization(how, tmp_path):
    run = launch_on_ranks(HELPER, how, str(tmp_path), timeout=120)
    # Both ranks got as far as their results either way.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.txt", "rank1.txt"]
    output = run.stdout + run.stderr
    if how == "interpreter":
        assert run.returncode != 0 and ABORT in output, output[-3000:]
    else:
        assert run.returncode == 0 and ABORT not in output, output[-3000:]
