"""Preference data: the synthetic task with a known gold reward, and local JSONL/Parquet files.

Pure Python (no torch): the CLI validates data files before any trial is launched.

The synthetic task ("sentiment of a review") has a gold reward that is a known function of the
response text: (positive words - negative words) / words, in [-1, 1]. Chosen responses score
higher than rejected ones under it, so a learned reward model can be checked against the truth
and a policy that games the learned reward (rather than improving) is visible.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

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


def synthetic_preferences(count: int, seed: int) -> list[PreferenceExample]:
    """`count` prompts, each with two responses of random sentiment; the better one is chosen."""
    rng = random.Random(seed)
    examples = []
    while len(examples) < count:
        prompt = f"{PROMPT_PREFIX} {' '.join(rng.choices(NEUTRAL_WORDS, k=rng.randint(2, 4)))} :"
        first = _synthetic_response(rng, rng.uniform(-1, 1))
        second = _synthetic_response(rng, rng.uniform(-1, 1))
        if gold_reward(first) == gold_reward(second):
            continue
        if gold_reward(first) < gold_reward(second):
            first, second = second, first
        examples.append(PreferenceExample(prompt, first, second))
    return examples


_FIELDS = ("prompt", "chosen", "rejected")


def _check_row(row: object, where: str) -> PreferenceExample:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected an object with {', '.join(_FIELDS)}")
    for name in _FIELDS:
        if name not in row:
            raise InputError(f"{where}: missing field {name!r}")
        if not isinstance(row[name], str) or not row[name].strip():
            raise InputError(f"{where}: field {name!r} must be a non-empty string")
    return PreferenceExample(row["prompt"], row["chosen"], row["rejected"])


def load_preference_file(path: str | Path) -> list[PreferenceExample]:
    """Read `prompt`/`chosen`/`rejected` rows (DeepSpeed-Chat's layout) from JSONL or Parquet."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path}: not found")
    examples = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(read_text(path).split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise InputError(f"{path}:{number}: nested too deeply") from None
            examples.append(_check_row(row, f"{path}:{number}"))
    elif path.suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
        missing = [name for name in _FIELDS if name not in frame.columns]
        if missing:
            raise InputError(f"{path}: missing column {missing[0]!r}")
        for number, row in enumerate(frame[list(_FIELDS)].to_dict("records"), start=1):
            examples.append(_check_row(row, f"{path}: row {number}"))
    else:
        raise InputError(f"data file {path}: expected .jsonl or .parquet")
    if len(examples) < 2:
        raise InputError(f"{path}: needs at least 2 rows, found {len(examples)}")
    return examples


def load_preferences(source: str, train_size: int, eval_size: int, seed: int):
    """(train, held-out) examples for a data source; `synthetic` or a file path."""
    if source == "synthetic":
        examples = synthetic_preferences(train_size + eval_size, seed)
    else:
        examples = load_preference_file(source)
    eval_count = min(eval_size, len(examples) // 2)
    return examples[eval_count:], examples[:eval_count]
