"""Token tensors for the three stages, and which rows each rank reads at each step.

Layouts (DeepSpeed-Chat's): supervised sequences are [prompt][response][eos][pad...] padded on
the right to max_prompt_len + max_answer_len; PPO prompts are padded on the left to
max_prompt_len so every answer starts at the same column.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from tunelab.data import PreferenceExample


@dataclass(frozen=True)
class Sequences:
    ids: torch.Tensor  # [N, S] token ids
    mask: torch.Tensor  # [N, S] 1 for real tokens

    def rows(self, index: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[index].to(device), self.mask[index].to(device)


@dataclass(frozen=True)
class EncodedData:
    sft: Sequences  # prompt + chosen
    chosen: Sequences
    rejected: Sequences
    eval_chosen: Sequences
    eval_rejected: Sequences
    prompts: Sequences  # left-padded
    eval_prompts: Sequences


def _pad(rows: list[list[int]], length: int, pad_id: int, left: bool) -> Sequences:
    fill = [length - len(row) for row in rows]
    if left:
        ids = [[pad_id] * n + row for n, row in zip(fill, rows, strict=True)]
        mask = [[0] * n + [1] * len(row) for n, row in zip(fill, rows, strict=True)]
    else:
        ids = [row + [pad_id] * n for n, row in zip(fill, rows, strict=True)]
        mask = [[1] * len(row) + [0] * n for n, row in zip(fill, rows, strict=True)]
    shape = (len(rows), length)  # no rows: still [0, length]
    return Sequences(torch.tensor(ids, dtype=torch.long).reshape(shape),
                     torch.tensor(mask, dtype=torch.long).reshape(shape))  # fmt: skip


def encode(tokenizer, examples: list[PreferenceExample], eval_examples, prompt_len, answer_len):
    """Tokenise every distinct text once, in batched calls per kind (a call per text pays the
    tokenizer's Python wrapper each time: the tiny trial's data took 1.3 s that way, 0.5 s
    so), keeping only the ids a row uses; prompts keep their last tokens when truncated."""
    rows = [*examples, *eval_examples]
    prompt_of = _token_ids(tokenizer, [r.prompt for r in rows], True, slice(-prompt_len, None))
    response_of = _token_ids(tokenizer, [t for r in rows for t in (r.chosen, r.rejected)],
                             False, slice(answer_len - 1))  # fmt: skip

    def prompt_ids(text: str) -> list[int]:
        return prompt_of[text]

    def response_ids(text: str) -> list[int]:
        return [*response_of[text], tokenizer.eos_token_id]

    def supervised(rows: list[PreferenceExample], field: str) -> Sequences:
        joined = [prompt_ids(r.prompt) + response_ids(getattr(r, field)) for r in rows]
        return _pad(joined, prompt_len + answer_len, tokenizer.pad_token_id, left=False)

    def prompts(rows: list[PreferenceExample]) -> Sequences:
        return _pad([prompt_ids(r.prompt) for r in rows], prompt_len, tokenizer.pad_token_id, True)

    chosen = supervised(examples, "chosen")
    return EncodedData(
        sft=chosen,
        chosen=chosen,
        rejected=supervised(examples, "rejected"),
        eval_chosen=supervised(eval_examples, "chosen"),
        eval_rejected=supervised(eval_examples, "rejected"),
        prompts=prompts(examples),
        eval_prompts=prompts(eval_examples),
    )


ENCODE_CHUNK = 2048  # texts per tokenizer call: its buffers for a whole file at once are large


def _token_ids(tokenizer, texts: list[str], special_tokens: bool,
               kept: slice) -> dict[str, list[int]]:  # fmt: skip
    """The `kept` part of each distinct text's token ids."""
    distinct = list(dict.fromkeys(texts))
    ids: dict[str, list[int]] = {}
    for start in range(0, len(distinct), ENCODE_CHUNK):
        chunk = distinct[start : start + ENCODE_CHUNK]
        encoded = tokenizer(chunk, add_special_tokens=special_tokens)["input_ids"]
        ids.update((text, row[kept]) for text, row in zip(chunk, encoded, strict=True))
    return ids


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] column of each row's last real token (works for left and right padding)."""
    columns = torch.arange(mask.shape[1], device=mask.device)
    return (mask * columns).argmax(dim=1)


def batch_indices(num_rows: int, batch: int, step: int, rank: int, world: int, seed: int):
    """Rows of `rank`'s micro-batch number `step`: ranks read disjoint slices of a seeded
    permutation, a new permutation each pass over the data."""
    start = (step * world + rank) * batch
    rows = []
    for position in range(start, start + batch):
        epoch, offset = divmod(position, num_rows)
        rows.append(_permutation(num_rows, seed + epoch)[offset])
    return rows


@functools.lru_cache(maxsize=4)
def _permutation(num_rows: int, seed: int) -> list[int]:
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).tolist()


def eval_batches(num_rows: int, batch: int, rank: int, world: int):
    """(rows, counted) batches of this rank's share of an evaluation set.

    Every rank gets the same number of equally sized batches (ZeRO-3 ranks must run the same
    forwards); padding rows repeat row 0 and have counted=False.
    """
    share = list(range(rank, num_rows, world))
    per_rank = math.ceil(num_rows / world)
    count = math.ceil(per_rank / batch)
    padded = share + [0] * (count * batch - len(share))
    counted = [True] * len(share) + [False] * (count * batch - len(share))
    return [
        (padded[i * batch : (i + 1) * batch], counted[i * batch : (i + 1) * batch])
        for i in range(count)
    ]
