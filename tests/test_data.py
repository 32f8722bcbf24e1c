"""Preference data: the synthetic task's gold reward and the JSONL/Parquet loader."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tunelab.data import gold_reward, load_preference_file, load_preferences, synthetic_preferences
from tunelab.errors import InputError


def test_gold_reward_is_the_known_function():
    assert gold_reward(" good great film") == pytest.approx(2 / 3)
    assert gold_reward(" bad film") == pytest.approx(-0.5)
    assert gold_reward(" the film was good and bad") == 0.0
    assert gold_reward("") == 0.0


def test_synthetic_pairs_prefer_higher_gold_and_are_seeded():
    pairs = synthetic_preferences(200, seed=7)
    assert all(gold_reward(p.chosen) > gold_reward(p.rejected) for p in pairs)
    assert pairs == synthetic_preferences(200, seed=7)
    assert pairs != synthetic_preferences(200, seed=8)
    # Room for PPO to improve: chosen answers are far from the maximum gold reward of 1.
    mean_chosen = sum(gold_reward(p.chosen) for p in pairs) / len(pairs)
    assert 0.0 < mean_chosen < 0.5


def test_split_keeps_held_out_apart():
    train, held_out = load_preferences("synthetic", 100, 20, seed=1)
    assert len(train) == 100 and len(held_out) == 20
    assert not set(train) & set(held_out)


def _rows(n):
    return [
        {"prompt": f"Human: q{i}\n\nAssistant:", "chosen": " yes", "rejected": " no"}
        for i in range(n)
    ]


def test_jsonl_and_parquet_load(tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in _rows(5)) + "\n")
    parquet = tmp_path / "pairs.parquet"
    pd.DataFrame(_rows(5)).to_parquet(parquet)
    assert load_preference_file(jsonl) == load_preference_file(parquet)
    assert load_preference_file(jsonl)[2].prompt == "Human: q2\n\nAssistant:"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"\n',
            ":2: not valid JSON",
        ),
        (
            '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n',
            ":2: missing field 'rejected'",
        ),
        (
            '{"prompt": "a", "chosen": "b", "rejected": 3}\n',
            ":1: field 'rejected' must be a non-empty string",
        ),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError) as info:
        load_preference_file(path)
    assert str(path) + message in str(info.value)


def test_parquet_missing_column_and_missing_file(tmp_path):
    path = tmp_path / "bad.parquet"
    pd.DataFrame([{"prompt": "a", "chosen": "b"}] * 3).to_parquet(path)
    with pytest.raises(InputError, match="missing column 'rejected'"):
        load_preference_file(path)
    with pytest.raises(InputError, match="not found"):
        load_preference_file(tmp_path / "absent.jsonl")
