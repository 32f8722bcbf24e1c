"""Measure model-state bytes of live DeepSpeed engines over a grid of settings.

    python tests/helpers/measure_states.py OUT.json                       (one rank)
    torchrun --standalone --nproc_per_node 2 tests/helpers/measure_states.py OUT.json

Each engine takes one optimizer step (so Adam's moments exist) and one more backward, then
rank 0 records engine_state_bytes: the moment between backward and step, when parameters,
gradients and optimizer states all exist. During that second backward a hook after each
gradient (registered after DeepSpeed's own) reads the engine again, and the largest gradient
plus buffer bytes seen (ZeRO-1/2 allocate their reduce buckets there) are kept as
`backward`.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from tunelab.config import EngineConfig, load_config
from tunelab.dsconfig import train_ds_config
from tunelab.pipeline.models import (
    build_causal_lm,
    build_value_model,
    prepare_for_training,
    train_engine,
    train_tokenizer,
)
from tunelab.pipeline.process_end import end_process
from tunelab.pipeline.run import _quiet_libraries
from tunelab.pipeline.runtime import start_runtime
from tunelab.pipeline.telemetry import engine_state_bytes
from tunelab.presets import resolve_model


def grid():
    for precision in ("bf16", "fp32"):
        for stage in (0, 1, 2, 3):
            for lora in (0, 4):
                for offload in ("none", "cpu") if stage else ("none",):
                    if precision == "fp32" and (lora or offload == "cpu"):
                        continue  # fp32 spot-checks the stages only
                    for role in ("actor", "critic"):
                        yield {"precision": precision, "zero_stage": stage, "lora_rank": lora,
                               "offload_optimizer": offload, "role": role}  # fmt: skip


class BackwardPeak:
    """Largest grads + buffers of a live engine seen after each gradient of one backward."""

    def __init__(self, engine, accelerator: str) -> None:
        self.peak: dict[str, dict[str, int]] | None = None
        self._engine, self._accelerator = engine, accelerator
        self._hooks = [
            param.register_post_accumulate_grad_hook(self._measure)
            for param in engine.module.parameters()
            if param.requires_grad
        ]

    def _measure(self, _param) -> None:
        states = engine_state_bytes(self._engine, self._accelerator)
        if self.peak is None or _sum(states) > _sum(self.peak):
            self.peak = {name: states[name] for name in ("grads", "buffers")}

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _sum(states: dict[str, dict[str, int]]) -> int:
    return sum(states[name]["device"] + states[name]["host"] for name in ("grads", "buffers"))


def main(out_path: str) -> None:
    _quiet_libraries()
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    base = load_config(None, [f"ranks={ranks}", "batch.train_micro=4", "batch.generation_micro=4"])
    runtime = start_runtime(base)
    tokenizer = train_tokenizer(["review of the film : good bad fine"] * 4, vocab_size=128)
    source = resolve_model("tiny")
    records = []
    for case in grid():
        config = base.replace(precision=case["precision"])
        engine_config = EngineConfig(
            zero_stage=case["zero_stage"], lora_rank=case["lora_rank"],
            offload_optimizer=case["offload_optimizer"], learning_rate=1e-3,
        )  # fmt: skip
        ds_config = train_ds_config(config, engine_config, 1e-3)
        build = build_causal_lm if case["role"] == "actor" else build_value_model
        model = prepare_for_training(build(source, tokenizer, ds_config), engine_config)
        engine = train_engine(model, ds_config, engine_config)
        torch.manual_seed(0)
        ids = torch.randint(4, len(tokenizer), (4, 12))
        for step in range(2):
            out = engine(input_ids=ids, attention_mask=torch.ones_like(ids))
            loss = out.logits.float().mean() if case["role"] == "actor" else out.float().mean()
            backward = BackwardPeak(engine, runtime.accelerator) if step == 1 else None
            engine.backward(loss)
            if step == 0:
                engine.step()
        backward.remove()
        measured = engine_state_bytes(engine, runtime.accelerator)
        records.append({**case, "ranks": ranks, "measured": measured, "backward": backward.peak})
        engine.destroy()
    if runtime.is_main:
        with open(out_path, "w") as handle:
            json.dump(records, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process(0)  # as a trial process ends (tunelab.pipeline.process_end)
