"""A DeepSpeed-Chat user's own checkpoints, data and command line, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT, TINY
from .helpers.dschat_checkpoints import write_step1, write_step2


def tunelab(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tunelab", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)  # fmt: skip


def test_ppo_alone_over_dschat_step1_and_step2_outputs(tmp_path):
    from tunelab.data import synthetic_preferences
    from tunelab.pipeline.models import train_tokenizer

    texts = [t for e in synthetic_preferences(256, 0) for t in (e.prompt, e.chosen, e.rejected)]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    write_step1(tmp_path / "step1", tokenizer)
    write_step2(tmp_path / "step2", tokenizer, zero3_form=True)
    out = tmp_path / "t"
    run = tunelab("trial", TINY, "--out", out, f"models.actor={tmp_path / 'step1'}",
                  f"models.critic={tmp_path / 'step2'}", "sft.steps=0", "rm.steps=0",
                  "ppo.steps=4")  # fmt: skip
    assert run.returncode == 0, run.stdout + (out / "trial.log").read_text()[-3000:]
    assert "RM   given, held-out accuracy" in run.stdout
    result = json.loads((out / "metrics.json").read_text())
    assert result["stages"] == {
        "sft": {"source": "given", "model": str(tmp_path / "step1")},
        "rm": {"source": "given", "model": str(tmp_path / "step2")},
    }
    engines = result["engines"]
    assert engines["actor"]["weights"] == f"checkpoint {tmp_path / 'step1'}"
    assert engines["reward"]["weights"] == f"checkpoint {tmp_path / 'step2'}"
    assert engines["critic"]["parameters"] == result["metrics"]["model/critic/parameters"] > 0
    assert "sft/loss_final" not in result["metrics"]  # nothing trained before PPO
    assert 0 <= result["metrics"]["rm/eval_accuracy"] <= 1
    log = (out / "trial.log").read_text()
    assert f"weights: checkpoint {tmp_path / 'step2'}" in log
