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


def _pairs(count, start=0):
    return [{"prompt": f"review of q{i} :", "chosen": "good film", "rejected": "bad film"}
            for i in range(start, start + count)]  # fmt: skip


def test_dschat_local_jsonfile_folder_with_its_own_eval_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("\n".join(map(json.dumps, _pairs(6))) + "\n")
    (tmp_path / "data" / "eval.json").write_text(json.dumps(_pairs(3, start=100)))  # an array
    train, held_out = load_preferences(str(tmp_path), 2048, 64, seed=0)
    assert [e.prompt for e in train] == [f"review of q{i} :" for i in range(6)]
    assert [e.prompt for e in held_out] == [f"review of q{i} :" for i in range(100, 103)]
    assert len(load_preferences(str(tmp_path), 2048, 2, seed=0)[1]) == 2  # eval_size caps it


def test_formats_are_told_apart_by_content_and_response_stands_for_chosen(tmp_path):
    rows = [{"prompt": r["prompt"], "response": r["chosen"], "rejected": r["rejected"]}
            for r in _pairs(4)]  # fmt: skip
    named_json = tmp_path / "pairs.json"
    pd.DataFrame(rows).to_parquet(named_json)  # Parquet under a .json name
    array = tmp_path / "pairs.data"
    array.write_text(json.dumps(rows))
    lines = tmp_path / "pairs.txt"
    lines.write_text("\n".join(map(json.dumps, rows)))
    loaded = [load_preference_file(p) for p in (named_json, array, lines)]
    assert loaded[0] == loaded[1] == loaded[2]
    assert loaded[0][0].chosen == "good film"


def test_a_separate_eval_file_and_errors_that_name_the_place(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(map(json.dumps, _pairs(5))))
    evaluation = tmp_path / "held.json"
    evaluation.write_text(json.dumps(_pairs(2, start=50)))
    _, held_out = load_preferences(str(train), 2048, 64, seed=0, eval_source=str(evaluation))
    assert [e.prompt for e in held_out] == ["review of q50 :", "review of q51 :"]
    evaluation.write_text(json.dumps([*_pairs(1), {"prompt": "p", "chosen": "c"}]))
    with pytest.raises(InputError, match=r"held.json: row 2: missing field 'rejected'"):
        load_preferences(str(train), 2048, 64, seed=0, eval_source=str(evaluation))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"a folder needs data/train\.json"):
        load_preferences(str(tmp_path / "empty"), 2048, 64, seed=0)


def test_hugging_face_datasets_need_the_datasets_package_or_load(tmp_path):
    import importlib.util

    saved = tmp_path / "saved"
    if importlib.util.find_spec("datasets") is None:
        saved.mkdir()
        (saved / "dataset_dict.json").write_text('{"splits": ["train"]}')
        with pytest.raises(InputError, match="needs the `datasets` package"):
            load_preferences(str(saved), 2048, 64, seed=0)
        return
    import datasets

    splits = {"train": _pairs(4), "test": _pairs(2, 10)}
    dataset = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    dataset.save_to_disk(saved)
    train, held_out = load_preferences(str(saved), 2048, 64, seed=0)
    assert len(train) == 4
    assert [e.prompt for e in held_out] == ["review of q10 :", "review of q11 :"]
