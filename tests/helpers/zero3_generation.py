"""Generate with a ZeRO-3 actor on 2 ranks whose answers end at different lengths.

    torchrun --standalone --nproc_per_node 2 tests/helpers/zero3_generation.py MODE OUT.json

Rank 0 asks for 2 new tokens, rank 1 for 9, through PPOTrainer.generate's own path
(models.generation_weights + decoding.decode, synced per ppo.zero3_generation). Without one
gather or synced_gpus the ranks fall out of step in DeepSpeed's per-layer gathers and hang. A
forward pre-pre-hook on the model counts the forwards (one per token) that started with every
linear weight partitioned, i.e. gathered again for that token (nothing persists or stays cached
here). Then, as PPO does after each step, the ranks take the max of per-rank values
(Runtime.all_max, the peaks so far behind memory stop lines).
"""

from __future__ import annotations

import json
import sys

import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

from tunelab.config import load_config
from tunelab.dsconfig import engine_ds_configs
from tunelab.pipeline.decoding import Decoding, decode
from tunelab.pipeline.models import (
    build_causal_lm,
    generation_weights,
    prepare_for_training,
    train_engine,
    train_tokenizer,
)
from tunelab.pipeline.process_end import end_process
from tunelab.pipeline.run import _quiet_libraries
from tunelab.pipeline.runtime import start_runtime
from tunelab.presets import resolve_model


def main(mode: str, out_path: str) -> None:
    _quiet_libraries()
    overrides = ["ranks=2", "actor.zero_stage=3", "batch.train_micro=2",
                 "batch.generation_micro=2", f"ppo.zero3_generation={mode}"]  # fmt: skip
    config = load_config(None, overrides)
    runtime = start_runtime(config)
    torch.manual_seed(0)
    tokenizer = train_tokenizer(["review of the film : good bad fine"] * 4, vocab_size=128)
    ds_config = engine_ds_configs(config)["actor"]
    # Nothing persists or stays cached between forwards, as for a model far above these limits.
    ds_config["zero_optimization"].update(
        stage3_param_persistence_threshold=0,
        stage3_max_live_parameters=0,
        stage3_max_reuse_distance=0,
        stage3_prefetch_bucket_size=0,
    )
    model = build_causal_lm(resolve_model("tiny"), tokenizer, ds_config)
    engine = train_engine(prepare_for_training(model, config.actor), ds_config, config.actor)
    engine.eval()
    prompt = torch.randint(4, len(tokenizer), (2, 5))
    fetches = [0]

    weights = [m.weight for m in engine.module.modules() if isinstance(m, torch.nn.Linear)]

    def count_fetch(module, args, kwargs):  # before any of DeepSpeed's hooks in this forward
        fetches[0] += all(w.ds_status == ZeroParamStatus.NOT_AVAILABLE for w in weights)

    engine.module.register_forward_pre_hook(count_fetch, prepend=True, with_kwargs=True)
    result = {"world_size": runtime.world_size}
    for new_tokens in (2, 9):
        before = fetches[0]
        wanted = new_tokens if runtime.rank == 1 else 2
        decoding = Decoding(max_new=wanted, min_new=wanted, eos_id=tokenizer.eos_token_id,
                            pad_id=tokenizer.pad_token_id, temperature=1.0,
                            synced=mode == "per_layer")  # fmt: skip
        with torch.no_grad(), generation_weights(engine, mode):
            output = decode(engine.module, prompt, torch.ones_like(prompt), decoding)
        result[f"width_{new_tokens}"] = output.shape[1] - prompt.shape[1]
        result[f"fetches_{new_tokens}"] = fetches[0] - before
    result["all_max"] = runtime.all_max({"rank": float(runtime.rank),
                                         "other": 5.0 * (1 - runtime.rank)})  # fmt: skip
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, result)
    if runtime.rank == 0:
        with open(out_path, "w") as handle:
            json.dump(gathered, handle)
    engine.destroy()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    end_process(0)  # as a trial process ends (tunelab.pipeline.process_end)
