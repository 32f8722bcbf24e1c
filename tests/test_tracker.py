"""The opt-in tracker: DeepSpeed's own monitor writes the trained engines' losses and PPO's
per-step curves into the trial folder; off by default, and never in an export."""

from __future__ import annotations

import csv
import importlib.util

import pytest

from tunelab.config import load_config
from tunelab.dsconfig import engine_ds_configs, with_tracker
from tunelab.errors import InputError
from tunelab.launcher import launch_trial

from .conftest import TINY


def _rows(path) -> list[list[str]]:
    with path.open() as handle:
        return list(csv.reader(handle))


def test_a_csv_tracker_writes_losses_and_ppo_curves(tmp_path):
    config = load_config(TINY, ["tracker=csv", "sft.steps=3", "rm.steps=3", "ppo.steps=3",
                                "warmup_steps=1", "data.train_size=128"])  # fmt: skip
    outcome = launch_trial(config, tmp_path, timeout_s=300)
    assert outcome.status == "ok", outcome.reason
    tracker = tmp_path / "tracker"
    assert sorted(p.name for p in tracker.iterdir()) == ["actor", "critic", "rm", "sft"]
    sft_loss = _rows(tracker / "sft" / "sft_loss.csv")  # tunelab's, per step
    assert sft_loss[0] == ["step", "loss"] and [row[0] for row in sft_loss[1:]] == ["0", "1", "2"]
    assert (tracker / "rm" / "rm_loss.csv").is_file()
    assert (tracker / "critic" / "Train_Samples_lr.csv").is_file()  # DeepSpeed's own
    kl = _rows(tracker / "actor" / "ppo_kl.csv")  # one row per PPO step, as in metrics.json
    assert [row[0] for row in kl[1:]] == ["0", "1", "2"]
    assert [float(row[1]) for row in kl[1:]] == pytest.approx(outcome.series["ppo/kl"])


def test_off_by_default_and_never_in_the_exported_configs():
    config = load_config(TINY)
    assert config.tracker == "none"
    configs = engine_ds_configs(load_config(TINY, ["tracker=csv"]))
    assert not any("csv_monitor" in c for c in configs.values())  # what export writes
    tracked = with_tracker(configs, "csv", "/trial/tracker")
    assert tracked["critic"]["csv_monitor"] == {"enabled": True, "output_path": "/trial/tracker",
                                               "job_name": "critic"}  # fmt: skip
    assert "csv_monitor" not in tracked["reference"]  # frozen engines log nothing


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None,
                    reason="tensorboard is installed here")  # fmt: skip
def test_a_tracker_whose_package_is_missing_is_one_line():
    with pytest.raises(InputError, match="tracker: tensorboard needs the tensorboard package"):
        load_config(TINY, ["tracker=tensorboard"])
