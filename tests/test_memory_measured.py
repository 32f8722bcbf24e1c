"""Predicted model-state bytes per rank against bytes read off live DeepSpeed engines.

One real engine per grid point (ZeRO 0-3, LoRA, optimizer offload, actor and critic, bf16 with
fp32 spot checks), on 1 rank in a subprocess and on 2 gloo ranks through torchrun. The model
is never fitted to these measurements: they are held out.

    pytest tests/test_memory_measured.py -s -k agreement     # prints the worst deviation
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tunelab.config import EngineConfig, load_config
from tunelab.dsconfig import train_ds_config
from tunelab.memory import ZeroSettings, engine_states, engine_tensors
from tunelab.presets import PRESETS

from .conftest import ROOT
from .helpers.measure_states import grid

HELPER = ROOT / "tests" / "helpers" / "measure_states.py"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Largest relative deviation allowed between predicted and measured bytes; README quotes it.
TOLERANCE = 0.02
CATEGORIES = ("params", "grads", "optimizer")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("states")
    runs = {
        1: [sys.executable, str(HELPER)],
        2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(HELPER)],
    }  # fmt: skip
    # In-process trials of this pytest run set the rank variables; the helpers start clean.
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    records = {}
    for ranks, argv in runs.items():
        out = folder / f"ranks{ranks}.json"
        run = subprocess.run([*argv, str(out)], capture_output=True, text=True, timeout=900,
                             env=env)  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        for record in json.loads(out.read_text()):
            key = (ranks, *(record[k] for k in ("precision", "zero_stage", "lora_rank",
                                                "offload_optimizer", "role")))  # fmt: skip
            records[key] = record
    return records


def _predicted(case, ranks):
    """The prediction for one grid point, from the DeepSpeed config the helper's engine got."""
    config = load_config(None, [f"ranks={ranks}", f"precision={case['precision']}"])
    engine = EngineConfig(
        zero_stage=case["zero_stage"], lora_rank=case["lora_rank"],
        offload_optimizer=case["offload_optimizer"], learning_rate=1e-3,
    )  # fmt: skip
    zero = ZeroSettings.from_ds_config(train_ds_config(config, engine, 1e-3))
    trainable, frozen = engine_tensors(
        PRESETS["tiny"], engine, value_head=case["role"] == "critic"
    )
    return engine_states(trainable, frozen, zero, ranks=ranks, precision=case["precision"])


def _total(measurement, *categories):
    return sum(measurement[c]["device"] + measurement[c]["host"] for c in categories)


def _deviations(measured):
    """(name, predicted, measured) of every comparison the tests make."""
    rows = []
    for (ranks, *values), record in measured.items():
        case = dict(zip(("precision", "zero_stage", "lora_rank", "offload_optimizer", "role"),
                        values, strict=True))  # fmt: skip
        predicted = _predicted(case, ranks)
        name = f"{ranks}rank-" + "-".join(map(str, values))
        got = record["measured"]
        rows.append((f"{name} model states", predicted.model_states.total,
                     _total(got, *CATEGORIES)))  # fmt: skip
        rows.append((f"{name} buffers", predicted.buffers.total, _total(got, "buffers")))
        if case["zero_stage"] <= 1:
            backward = record["backward"]
            rows.append((f"{name} backward gradients", predicted.backward_grads.total,
                         _total(backward, "grads")))  # fmt: skip
            rows.append((f"{name} backward buffers",
                         (predicted.buffers + predicted.buckets).total,
                         _total(backward, "buffers")))  # fmt: skip
    return rows


CASES = [(ranks, case) for ranks in (1, 2) for case in grid()]


@pytest.mark.parametrize(
    ("ranks", "case"),
    CASES,
    ids=[f"{r}rank-{c['precision']}-z{c['zero_stage']}-lora{c['lora_rank']}-"
         f"offload_{c['offload_optimizer']}-{c['role']}" for r, c in CASES],
)  # fmt: skip
def test_model_states_within_tolerance(measured, ranks, case):
    record = measured[(ranks, *case.values())]
    predicted = _predicted(case, ranks)
    got = record["measured"]
    assert predicted.model_states.total == pytest.approx(_total(got, *CATEGORIES), rel=TOLERANCE)
    assert predicted.buffers.total == pytest.approx(_total(got, "buffers"), rel=TOLERANCE, abs=64)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_zero1_holds_every_gradient_during_backward(measured, precision):
    """ZeRO-1 on 2 gloo ranks: at the end of backward every 16-bit gradient is alive (not this
    rank's half), beside one reduce bucket of reduce_bucket_size elements."""
    for role in ("actor", "critic"):
        case = {"precision": precision, "zero_stage": 1, "lora_rank": 0,
                "offload_optimizer": "none", "role": role}  # fmt: skip
        record = measured[(2, *case.values())]
        predicted = _predicted(case, 2)
        width = 4 if precision == "fp32" else 2
        trainable, _ = engine_tensors(PRESETS["tiny"], EngineConfig(), role == "critic")
        assert predicted.backward_grads.total == width * sum(trainable)
        gradients = _total(record["backward"], "grads")
        assert gradients == pytest.approx(predicted.backward_grads.total, rel=TOLERANCE)
        # Between backward and step only this rank's partition is left (about half).
        assert _total(record["measured"], "grads") < 0.6 * gradients
        bucket = _total(record["backward"], "buffers")
        assert bucket == predicted.buckets.total == width * 500_000_000  # DeepSpeed's default


def _deviation(predicted: int, measured: int) -> float:
    """Relative deviation; byte-sized differences (alignment padding) count as none."""
    if abs(predicted - measured) <= 64:
        return 0.0
    return abs(predicted - measured) / measured if measured else float("inf")


def test_agreement_within_tolerance(measured):
    """Every comparison at once; prints the worst relative deviation (README quotes it)."""
    rows = [(name, p, m, _deviation(p, m)) for name, p, m in _deviations(measured)]
    worst = max(rows, key=lambda row: row[3])
    print(
        f"\n{len(rows)} comparisons over {len(measured)} live engines; worst deviation "
        f"{worst[3]:.2%} ({worst[0]}: predicted {worst[1]:,}, measured {worst[2]:,} bytes)"
    )
    assert worst[3] <= TOLERANCE


def test_partitioning_is_real(measured):
    """ZeRO-1..3 halve the optimizer states per rank on 2 ranks; ZeRO-3 also the params."""
    for stage in (1, 2, 3):
        one = measured[(1, "bf16", stage, 0, "none", "actor")]["measured"]
        two = measured[(2, "bf16", stage, 0, "none", "actor")]["measured"]
        assert two["optimizer"]["device"] == pytest.approx(
            one["optimizer"]["device"] / 2, rel=0.01
        )
    zero0 = measured[(2, "bf16", 0, 0, "none", "actor")]["measured"]
    zero3 = measured[(2, "bf16", 3, 0, "none", "actor")]["measured"]
    assert zero3["params"]["device"] < 0.8 * zero0["params"]["device"]
