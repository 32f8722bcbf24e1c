"""ZeRO-3 generation on 2 gloo ranks whose answers end at different lengths.

Before tunelab lifted DeepSpeed's hooks for generation (or passed synced_gpus), such ranks fell
out of step in the per-layer gathers: the trial hung ("Connection closed by peer" under gloo).
"""

from __future__ import annotations

import json

import pytest

from ..conftest import ROOT
from ..helpers.ranks import run_on_ranks

HELPER = ROOT / "tests" / "helpers" / "zero3_generation.py"


@pytest.mark.parametrize("mode", ["gather_once", "per_layer"])
def test_ranks_finish_at_different_lengths(mode, tmp_path):
    out = tmp_path / "result.json"
    run_on_ranks(HELPER, mode, str(out))
    rank0, rank1 = json.loads(out.read_text())
    assert (rank0["width_9"], rank1["width_9"]) == (2, 9)  # each rank got its own length
    if mode == "gather_once":
        # Gathered once per generate call: no token starts with partitioned weights.
        assert rank0["fetches_9"] == rank1["fetches_9"] == 0
    else:
        # DeepSpeed-Chat's way: every token gathers the layers again, and the rank that is
        # done keeps stepping (synced_gpus) until the longest answer ends.
        assert rank0["fetches_9"] == rank1["fetches_9"] == 9
        assert rank0["fetches_2"] == rank1["fetches_2"] == 2
