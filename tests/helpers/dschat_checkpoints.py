"""Tiny checkpoints laid out as DeepSpeed-Chat writes them (dschat/utils/utils.py):
save_hf_format saves `state_dict()` to pytorch_model.bin with config.json; save_zero_three_model
saves the gathered `named_parameters()` (a tied tensor once). Its step-2 RewardModel keeps the
backbone as `rwtransformer` and the head as `v_head` (dschat/utils/model/reward_model.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from tunelab.presets import PRESETS


def tiny_config(tokenizer):
    kwargs = PRESETS["tiny"].hf_config()
    kwargs.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


class RewardModel(nn.Module):
    """DeepSpeed-Chat's step-2 module layout: rwtransformer (a base model) + v_head."""

    def __init__(self, config) -> None:
        super().__init__()
        self.rwtransformer = AutoModel.from_config(config)
        self.v_head = nn.Linear(config.word_embed_proj_dim, 1, bias=False)

    def scores(self, ids: torch.Tensor) -> torch.Tensor:
        """[B] value at the last position (ids without padding)."""
        hidden = self.rwtransformer(input_ids=ids).last_hidden_state
        return self.v_head(hidden).squeeze(-1)[:, -1]


def _save(module: nn.Module, config, tokenizer, folder: Path, zero3_form: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if zero3_form:
        state = {name: p.detach().clone() for name, p in module.named_parameters()}
    else:
        state = module.state_dict()
    torch.save(state, folder / "pytorch_model.bin")
    config.to_json_file(folder / "config.json")
    tokenizer.save_pretrained(folder)
    return folder


def write_step1(folder: Path, tokenizer, zero3_form: bool = False) -> nn.Module:
    config = tiny_config(tokenizer)
    model = AutoModelForCausalLM.from_config(config).eval()
    _save(model, config, tokenizer, folder, zero3_form)
    return model


def write_step2(folder: Path, tokenizer, zero3_form: bool = False) -> RewardModel:
    config = tiny_config(tokenizer)
    model = RewardModel(config).eval()
    with torch.no_grad():
        model.v_head.weight.normal_(std=1.0)  # a head far from zero: its loading shows
    _save(model, config, tokenizer, folder, zero3_form)
    return model
