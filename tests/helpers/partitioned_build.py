"""Host memory of building a ZeRO-3 model on each of 2 ranks, as a trial builds it.

    torchrun --standalone --nproc_per_node 2 tests/helpers/partitioned_build.py PRESET OUT.json

Builds the preset's causal LM for a frozen ZeRO-3 bf16 engine (the reference model's path) and
records, per rank, the peak rise of resident memory while building the model and its engine,
next to the whole model's bytes in bf16.
"""

from __future__ import annotations

import json
import sys

import torch

from tunelab.config import load_config
from tunelab.dsconfig import eval_ds_config
from tunelab.pipeline.models import build_causal_lm, frozen_engine, train_tokenizer
from tunelab.pipeline.process_end import end_process
from tunelab.pipeline.run import _quiet_libraries
from tunelab.pipeline.runtime import start_runtime
from tunelab.pipeline.telemetry import MemoryTracker, rss_bytes
from tunelab.presets import resolve_model


def main(preset: str, out_path: str) -> None:
    _quiet_libraries()
    config = load_config(None, ["ranks=2", "actor.zero_stage=3", "precision=bf16"])
    runtime = start_runtime(config)
    tokenizer = train_tokenizer(["review of the film : good bad fine"] * 4, vocab_size=128)
    source = resolve_model(preset)
    ds_config = eval_ds_config(config, zero_stage=3, offload=False)
    memory = MemoryTracker(runtime.device, interval_s=0.002)
    before = rss_bytes()
    with memory.stage("build"):
        engine = frozen_engine(build_causal_lm(source, tokenizer, ds_config), ds_config)
    memory.close()
    record = {
        "rank": runtime.rank,
        "rise_bytes": memory.host_peak["build"] - before,
        "whole_bf16_bytes": 2 * source.shape.num_params(),
        "partition_bytes": sum(p.ds_tensor.numel() * 2 for p in engine.module.parameters()),
    }
    records = [None, None]
    torch.distributed.all_gather_object(records, record)
    if runtime.is_main:
        with open(out_path, "w") as handle:
            json.dump(records, handle)
    engine.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    end_process(0)  # as a trial process ends (tunelab.pipeline.process_end)
