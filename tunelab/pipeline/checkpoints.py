"""Checkpoints: a user's folder (which tensors it holds, how they map onto tunelab's models),
and the entries of the stage cache (tunelab.stagecache).

Understood layouts (all Hugging Face folders: config.json and weights, one file or sharded,
safetensors or PyTorch pickles):

- a causal LM (DeepSpeed-Chat step-1 output, any `*ForCausalLM`): the actor and reference;
- DeepSpeed-Chat's step-2 RewardModel: backbone under `rwtransformer.`, head `v_head.weight`,
  in both its plain form (`state_dict()`) and its ZeRO-3 consolidated form
  (`named_parameters()`, so a tied tensor appears once);
- a `*ForSequenceClassification` with one label: backbone under the model's base prefix, head
  `score.weight`;
- tunelab's own value model: `backbone.` and `v_head.weight`.

Nothing here builds a model; tunelab.pipeline.models does, and refuses any tensor it could not
place (see `ValueLayout`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tunelab.errors import TrialFailure

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE = ("model.safetensors", "pytorch_model.bin")
# Prefixes a value model's backbone may carry in a checkpoint that transformers cannot strip
# itself: DeepSpeed-Chat's RewardModel and tunelab's ValueModel.
_FOREIGN_PREFIXES = ("rwtransformer.", "backbone.")
HEAD_KEYS = ("v_head.weight", "score.weight")


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder (every shard of a sharded one)."""
    for index in _INDEXES:
        if (folder / index).is_file():
            shards = json.loads((folder / index).read_text())["weight_map"].values()
            return [folder / name for name in sorted(set(shards))]
    for single in _SINGLE:
        if (folder / single).is_file():
            return [folder / single]
    raise TrialFailure(f"{folder}: no model.safetensors or pytorch_model.bin (sharded or not)")


def _read(path: Path, keys_only: bool) -> dict[str, torch.Tensor | None]:
    if path.suffix == ".safetensors":
        if keys_only:
            with safe_open(str(path), framework="pt") as handle:
                return dict.fromkeys(handle.keys())
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return dict.fromkeys(state) if keys_only else state


def checkpoint_keys(folder: Path) -> list[str]:
    """Tensor names of a checkpoint (safetensors: from the headers; pickles are memory-mapped)."""
    return [key for path in weight_files(folder) for key in _read(path, keys_only=True)]


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, on the CPU."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        state.update(_read(path, keys_only=False))
    return state


@dataclass(frozen=True)
class ValueLayout:
    """Where a checkpoint keeps a value model's parts.

    `prefix`: the backbone's prefix when transformers cannot strip it (None: it can, or there
    is none); `head`: the head's tensor name, None when the checkpoint has no value head.
    """

    prefix: str | None
    head: str | None

    @property
    def name(self) -> str:
        if self.prefix == "rwtransformer.":
            return "DeepSpeed-Chat reward model"
        if self.prefix == "backbone.":
            return "tunelab value model"
        if self.head == "score.weight":
            return "sequence-classification model"
        return "language model without a value head"


def value_layout(keys: list[str]) -> ValueLayout:
    """The layout of a checkpoint loaded as a reward model or critic."""
    for prefix in _FOREIGN_PREFIXES:
        if any(key.startswith(prefix) for key in keys):
            return ValueLayout(prefix, "v_head.weight" if "v_head.weight" in keys else None)
    return ValueLayout(None, "score.weight" if "score.weight" in keys else None)


def backbone_state(state: dict[str, torch.Tensor], layout: ValueLayout) -> dict:
    """The backbone's tensors of a checkpoint whose prefix transformers does not know, keyed as
    the bare backbone (AutoModel) names them; the head and any other tensor are left out."""
    return {k[len(layout.prefix) :]: v for k, v in state.items() if k.startswith(layout.prefix)}


def strays(state_keys: list[str], layout: ValueLayout) -> list[str]:
    """Tensors of a foreign-prefixed checkpoint that are neither backbone nor head."""
    return sorted(k for k in state_keys if not k.startswith(layout.prefix) and k != layout.head)


def read_tensor(folder: Path, key: str) -> torch.Tensor:
    """One tensor of a checkpoint (the value head), without reading the others into memory."""
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                if key in set(handle.keys()):
                    return handle.get_tensor(key)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if key in state:
                return state[key].clone()
    raise TrialFailure(f"{folder}: no tensor {key}")


def save_stage_entry(folder: Path, state: dict[str, torch.Tensor], record: dict) -> bool:
    """Write a stage-cache entry (tunelab.stagecache) atomically: into a temporary folder, then
    renamed into place. False when another trial's entry for the same key got there first."""
    from tunelab.stagecache import RECORD, WEIGHTS

    folder.parent.mkdir(parents=True, exist_ok=True)
    draft = folder.with_name(f".{folder.name}.{os.getpid()}.draft")
    draft.mkdir()
    torch.save(state, draft / WEIGHTS)
    (draft / RECORD).write_text(json.dumps(record))
    try:
        draft.rename(folder)
    except OSError:  # the key is already cached: same settings, same weights
        shutil.rmtree(draft, ignore_errors=True)
        return False
    return True


def load_stage_entry(folder: Path, rank: int) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """(record, weights) of a cache entry; only rank 0 reads the weights (it hands them off)."""
    from tunelab.stagecache import RECORD, WEIGHTS

    record = json.loads((folder / RECORD).read_text())
    if rank != 0:
        return record, None
    return record, torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
