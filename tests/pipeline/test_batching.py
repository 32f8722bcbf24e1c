"""Token tensors of the three stages: what one batched tokenizer call per kind of text gives."""

from __future__ import annotations

import pytest
import torch

from tunelab.data import load_preferences
from tunelab.pipeline import batching
from tunelab.pipeline.batching import ENCODE_CHUNK, encode
from tunelab.pipeline.models import train_tokenizer

PROMPT_LEN, ANSWER_LEN = 6, 5  # short enough that prompts and answers are truncated


def _one_text_at_a_time(tokenizer, rows, field: str | None) -> tuple[list, list]:
    """Rows encoded text by text, padded as DeepSpeed-Chat lays them out (the layouts of
    tunelab.pipeline.batching): [(ids, mask)] per row."""
    ids, masks = [], []
    for row in rows:
        prompt = tokenizer(row.prompt)["input_ids"][-PROMPT_LEN:]
        if field is None:  # a PPO prompt, padded on the left
            pad = PROMPT_LEN - len(prompt)
            ids.append([tokenizer.pad_token_id] * pad + prompt)
            masks.append([0] * pad + [1] * len(prompt))
            continue
        answer = tokenizer(getattr(row, field), add_special_tokens=False)["input_ids"]
        joined = prompt + answer[: ANSWER_LEN - 1] + [tokenizer.eos_token_id]
        pad = PROMPT_LEN + ANSWER_LEN - len(joined)
        ids.append(joined + [tokenizer.pad_token_id] * pad)
        masks.append([1] * len(joined) + [0] * pad)
    return ids, masks


@pytest.mark.parametrize("chunk", [ENCODE_CHUNK, 7])
def test_batched_encoding_gives_each_row_what_encoding_it_alone_gives(chunk, monkeypatch):
    monkeypatch.setattr(batching, "ENCODE_CHUNK", chunk)
    train, held_out = load_preferences("synthetic", 40, 12, seed=3)
    tokenizer = train_tokenizer([t for r in train for t in (r.prompt, r.chosen, r.rejected)], 300)
    data = encode(tokenizer, train, held_out, PROMPT_LEN, ANSWER_LEN)
    expected = {
        "chosen": (train, "chosen"), "rejected": (train, "rejected"), "prompts": (train, None),
        "eval_chosen": (held_out, "chosen"), "eval_rejected": (held_out, "rejected"),
        "eval_prompts": (held_out, None),
    }  # fmt: skip
    truncated = 0
    for name, (rows, field) in expected.items():
        ids, masks = _one_text_at_a_time(tokenizer, rows, field)
        got = getattr(data, name)
        assert got.ids.dtype == got.mask.dtype == torch.long
        assert got.ids.tolist() == ids, name
        assert got.mask.tolist() == masks, name
        truncated += sum(all(row) for row in masks)
    assert truncated > 0  # the lengths above do cut some rows
    assert data.sft is data.chosen
    empty = encode(tokenizer, [], [], PROMPT_LEN, ANSWER_LEN)
    assert empty.prompts.ids.shape == (0, PROMPT_LEN)
    assert empty.chosen.ids.shape == (0, PROMPT_LEN + ANSWER_LEN)
