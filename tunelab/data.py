"""Preference data: the synthetic task with a known gold reward, and local JSONL/Parquet files.

Pure Python (no torch): the CLI validates data files before any trial is launched.

The synthetic task ("sentiment of a review") has a gold reward that is a known function of the
response text: (positive words - negative words) / words, in [-1, 1]. Chosen responses score
higher than rejected ones under it, so a learned reward model can be checked against the truth
and a policy that games the learned reward (rather than improving) is visible.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab._typed import read_text
from tunelab.errors import InputError

POSITIVE_WORDS = [
    "good",
    "great",
    "happy",
    "love",
    "fine",
    "nice",
    "superb",
    "lovely",
    "bright",
    "brilliant",
    "joyful",
    "wonderful",
    "excellent",
    "charming",
    "perfect",
    "delightful",
]
NEGATIVE_WORDS = [
    "bad",
    "awful",
    "sad",
    "hate",
    "poor",
    "ugly",
    "boring",
    "dull",
    "terrible",
    "gloomy",
    "horrible",
    "dreadful",
    "weak",
    "messy",
    "broken",
    "bitter",
]
NEUTRAL_WORDS = [
    "the",
    "a",
    "film",
    "book",
    "meal",
    "show",
    "plot",
    "cast",
    "food",
    "room",
    "staff",
    "story",
    "music",
    "scene",
    "place",
    "day",
    "it",
    "was",
    "is",
    "and",
    "with",
    "very",
    "quite",
    "rather",
    "this",
    "that",
    "of",
    "service",
    "price",
    "view",
]
PROMPT_PREFIX = "review of"
_POSITIVE = frozenset(POSITIVE_WORDS)
_NEGATIVE = frozenset(NEGATIVE_WORDS)


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str


def gold_reward(response: str) -> float:
    """Known reward of the synthetic task: (positive - negative words) / words, 0 when empty."""
    words = response.split()
    if not words:
        return 0.0
    positive = sum(word in _POSITIVE for word in words)
    negative = sum(word in _NEGATIVE for word in words)
    return (positive - negative) / len(words)


def _synthetic_response(rng: random.Random, sentiment: float) -> str:
    """4-8 words; each sentiment word is positive with probability (1 + sentiment) / 2."""
    words = []
    for _ in range(rng.randint(4, 8)):
        if rng.random() < 0.5:
            words.append(rng.choice(NEUTRAL_WORDS))
        elif rng.random() < (1 + sentiment) / 2:
            words.append(rng.choice(POSITIVE_WORDS))
        else:
            words.append(rng.choice(NEGATIVE_WORDS))
    return " ".join(words)


def synthetic_preferences(count: int, seed: int | str,
                          exclude: frozenset[PreferenceExample] = frozenset()):  # fmt: skip
    """`count` prompts, each with two responses of random sentiment; the better one is chosen.
    Examples in `exclude` (a held-out set) are drawn again."""
    rng = random.Random(seed)
    examples: list[PreferenceExample] = []
    while len(examples) < count:
        prompt = f"{PROMPT_PREFIX} {' '.join(rng.choices(NEUTRAL_WORDS, k=rng.randint(2, 4)))} :"
        first = _synthetic_response(rng, rng.uniform(-1, 1))
        second = _synthetic_response(rng, rng.uniform(-1, 1))
        if gold_reward(first) == gold_reward(second):
            continue
        if gold_reward(first) < gold_reward(second):
            first, second = second, first
        example = PreferenceExample(prompt, first, second)
        if example not in exclude:
            examples.append(example)
    return examples


_FIELDS = ("prompt", "chosen", "rejected")
# DeepSpeed-Chat's local/jsonfile dataset (dschat/utils/data/raw_datasets.py) reads
# <path>/data/train.json and <path>/data/eval.json; a folder may also hold them directly.
_SPLIT_NAMES = {"train": ("train",), "eval": ("eval", "test", "validation")}
_SUFFIXES = (".json", ".jsonl", ".parquet")


def _check_row(row: object, where: str) -> PreferenceExample:
    """A preference row; `response` stands for `chosen` where a dataset names it so
    (DeepSpeed-Chat's Dahoas-style rows)."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected an object with {', '.join(_FIELDS)}")
    if "chosen" not in row and "response" in row:
        row = {**row, "chosen": row["response"]}
    for name in _FIELDS:
        if name not in row:
            raise InputError(f"{where}: missing field {name!r}")
        if not isinstance(row[name], str) or not row[name].strip():
            raise InputError(f"{where}: field {name!r} must be a non-empty string")
    return PreferenceExample(row["prompt"], row["chosen"], row["rejected"])


def _parse_json(text: str, path: Path, line: int | None) -> Any:
    """`text` as JSON; an InputError naming the file and line (`line` None: the whole file,
    whose error gives its own line) when it is not."""
    where = f"{path}:{line}" if line is not None else str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        number = line if line is not None else exc.lineno
        raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise InputError(f"{where}: nested too deeply") from None


def _json_rows(path: Path) -> list[PreferenceExample]:
    """JSON lines, or one JSON array of rows (both are DeepSpeed-Chat's `.json`)."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        rows = _parse_json(text, path, None)
        return [_check_row(row, f"{path}: row {number}") for number, row
                in enumerate(rows, start=1)]  # fmt: skip
    return [_check_row(_parse_json(line, path, number), f"{path}:{number}")
            for number, line in enumerate(text.split("\n"), start=1) if line.strip()]  # fmt: skip


def _parquet_rows(path: Path) -> list[PreferenceExample]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
    if "chosen" not in frame.columns and "response" in frame.columns:
        frame = frame.rename(columns={"response": "chosen"})
    missing = [name for name in _FIELDS if name not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column {missing[0]!r}")
    return [_check_row(row, f"{path}: row {number}") for number, row
            in enumerate(frame[list(_FIELDS)].to_dict("records"), start=1)]  # fmt: skip


def load_preference_file(path: str | Path) -> list[PreferenceExample]:
    """`prompt`/`chosen`/`rejected` rows (DeepSpeed-Chat's fields) from one file: Parquet, a
    JSON array or JSON lines, told apart by content, not by name."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path}: not found")
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    examples = _parquet_rows(path) if magic == b"PAR1" else _json_rows(path)
    if len(examples) < 2:
        raise InputError(f"{path}: needs at least 2 rows, found {len(examples)}")
    return examples


def _split_file(folder: Path, split: str) -> Path | None:
    for place in (folder / "data", folder):  # DeepSpeed-Chat's layout first
        for name in _SPLIT_NAMES[split]:
            for suffix in _SUFFIXES:
                if (place / f"{name}{suffix}").is_file():
                    return place / f"{name}{suffix}"
    return None


def _dataset_splits(source: str) -> tuple[list, list | None]:
    """A Hugging Face dataset: a folder written by save_to_disk, or a hub name already in the
    local cache (nothing is downloaded)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local cache only
    try:
        import datasets
    except ImportError:
        raise InputError(f"data.source {source}: reading Hugging Face datasets needs the "
                         "`datasets` package (pip install datasets)") from None  # fmt: skip
    try:
        if Path(source).is_dir():
            loaded = datasets.load_from_disk(source)
        else:
            loaded = datasets.load_dataset(source)
    except Exception as exc:  # datasets raises many types for a missing or damaged dataset
        raise InputError(f"data.source {source}: not a readable dataset ({exc})") from None
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    split_of = {split: next((n for n in names if n in loaded), None)
                for split, names in _SPLIT_NAMES.items()}  # fmt: skip
    if split_of["train"] is None:
        raise InputError(f"data.source {source}: no train split (has {', '.join(loaded)})")

    def rows(split):
        return [_check_row(row, f"{source} [{split}] row {n}")
                for n, row in enumerate(loaded[split], start=1)]  # fmt: skip

    held_out = split_of["eval"]
    return rows(split_of["train"]), rows(held_out) if held_out else None


def read_preference_source(source: str) -> tuple[list[PreferenceExample], list | None]:
    """(train rows, evaluation rows or None) of a data source other than `synthetic`: a file,
    a folder in DeepSpeed-Chat's local/jsonfile layout (data/train.json, data/eval.json) or
    holding train/eval files itself, or a Hugging Face dataset (folder or cached hub name)."""
    path = Path(source)
    if path.is_file():
        return load_preference_file(path), None
    if path.is_dir():
        train = _split_file(path, "train")
        if train is not None:
            held_out = _split_file(path, "eval")
            return load_preference_file(train), (
                load_preference_file(held_out) if held_out else None
            )
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _dataset_splits(source)
        raise InputError(f"data.source {source}: a folder needs data/train.json (DeepSpeed-Chat's "
                         "local/jsonfile layout), train.json|.jsonl|.parquet, or a saved "
                         "Hugging Face dataset")  # fmt: skip
    if "/" in source and not source.startswith((".", "/", "~")):
        return _dataset_splits(source)
    raise InputError(f"data file {source}: not found")


def load_preferences(source: str, train_size: int, eval_size: int, seed: int,
                     eval_source: str | None = None, eval_seed: int | None = None):  # fmt: skip
    """(train, held-out) examples. `synthetic` generates them, the held-out set from
    `eval_seed` (None: the trial's `seed`), so trials with different seeds are evaluated on the
    same prompts; a file or folder gives its own evaluation split where it has one (or
    `eval_source`), else its first `eval_size` rows are held out. At most `eval_size` held-out
    rows are used."""
    if source == "synthetic":
        held_out = synthetic_preferences(
            eval_size, f"held-out:{seed if eval_seed is None else eval_seed}"
        )
        return synthetic_preferences(train_size, seed, frozenset(held_out)), held_out
    train, held_out = read_preference_source(source)
    if eval_source is not None:
        held_out = load_preference_file(eval_source)
    if held_out is None:
        count = min(eval_size, len(train) // 2)
        return train[count:], train[:count]
    return train, held_out[:eval_size]
