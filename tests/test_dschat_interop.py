"""A DeepSpeed-Chat user's own checkpoints, data and command line, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


ROUND_TRIP = {
    "defaults": [],
    "zero3-offload-fp16": [
        "actor.zero_stage=3", "critic.zero_stage=3", "actor.offload_optimizer=cpu",
        "critic.offload_optimizer=cpu", "actor.offload_params=cpu", "critic.offload_params=cpu",
        "offload_reference=true", "offload_reward=true", "precision=fp16",
    ],
    "step3-over-given-checkpoints": [
        "models.actor=/ckpt/step1", "models.critic=/ckpt/step2", "sft.steps=0", "rm.steps=0",
    ],
    "lora-batches-dropout": [
        "actor.zero_stage=1", "critic.zero_stage=2", "actor.lora_rank=8", "critic.lora_rank=16",
        "actor.lora_learning_rate=1e-3", "critic.dropout=0.05", "actor.dropout=null",
        "actor.gradient_checkpointing=true", "batch.grad_accum=2", "batch.train_micro=8",
        "batch.generation_micro=16", "ppo.epochs=2", "ppo.generation_batches=2", "seed=7",
        "ppo.max_prompt_len=6", "ppo.max_answer_len=12", "actor.learning_rate=3e-4",
    ],
}  # fmt: skip


@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_import_dschat_inverts_export(case):
    """import-dschat ∘ export keeps every setting both express (the models, PPO coefficients,
    step counts and data are outside DeepSpeed-Chat's flags or placeholders in the export)."""
    from tunelab._typed import with_dotted
    from tunelab.config import config_from_dict, load_config
    from tunelab.dschat import import_step3, step3_command

    config = load_config(TINY, ROUND_TRIP[case])
    argv, _ = step3_command(config)
    values, _ = import_step3(argv)
    for stage, role in (("sft", "actor"), ("rm", "critic")):
        if getattr(config, stage).steps:  # trained in the trial: the export names a placeholder
            values.pop(f"models.{role}")
            values.pop(f"{stage}.steps")
    assert "data.source" not in values  # the export names no data
    # DeepSpeed-Chat always decodes greedily to fixed-length answers: an import says so, an
    # export of a sampling trial notes the difference.
    assert values.pop("ppo.decoding") == "greedy"
    assert values.pop("ppo.min_answer_len") == values["ppo.max_answer_len"]
    assert config_from_dict(with_dotted(config.to_dict(), values)) == config


def test_dschat_local_jsonfile_folder_as_trial_data(tmp_path):
    from tunelab.data import synthetic_preferences

    rows = [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}
            for e in synthetic_preferences(120, seed=3)]  # fmt: skip
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("\n".join(map(json.dumps, rows[:100])))
    (tmp_path / "data" / "eval.json").write_text("\n".join(map(json.dumps, rows[100:])))
    out = tmp_path / "t"
    run = tunelab("trial", TINY, "--out", out, f"data.source={tmp_path}", "sft.steps=4",
                  "rm.steps=4", "ppo.steps=4")  # fmt: skip
    assert run.returncode == 0, run.stdout + (out / "trial.log").read_text()[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["rm/eval_pairs"] == 20  # its own eval.json, not rows held out of train.json
    assert "ppo/gold_gain" not in metrics  # a user's data has no gold reward


STEP3 = ["deepspeed", "--num_gpus", "1", "main.py", "--actor_model_name_or_path", "/ckpt/step1",
         "--critic_model_name_or_path", "/ckpt/step2", "--actor_zero_stage", "2",
         "--critic_zero_stage", "2", "--offload", "--actor_lora_dim", "128",
         "--enable_hybrid_engine", "--actor_gradient_checkpointing", "--actor_dropout", "0.0",
         "--per_device_training_batch_size", "8", "--per_device_generation_batch_size", "8",
         "--deepspeed"]  # fmt: skip


def test_import_dschat_makes_your_run_a_trial_and_a_study_baseline(tmp_path):
    from tunelab.config import load_config
    from tunelab.spec import load_spec

    out = tmp_path / "mine.yaml"
    run = tunelab("import-dschat", "--out", out, "--spec", ROOT / "studies" / "opt-1.3b-1gpu.yaml",
                  "--", *STEP3, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "note: --enable_hybrid_engine" in run.stdout
    config = load_config(out)
    assert (config.models.actor, config.sft.steps, config.rm.steps) == ("/ckpt/step1", 0, 0)
    assert config.actor.zero_stage == 2 and config.actor.offload_optimizer == "cpu"
    assert config.actor.lora_rank == 128 and config.precision == "fp16"  # DeepSpeed-Chat's default
    assert config.batch.train_micro == 8 and not config.hybrid_engine
    study = load_spec(tmp_path / "mine-study.yaml")
    mine = study.spec.baselines[0]
    assert mine.name == "your-dschat-run"
    assert mine.overrides["actor.lora_rank"] == 128 and mine.overrides["batch.train_micro"] == 8
    assert study.base_config["models"]["critic"] == "/ckpt/step2"


def test_import_dschat_refuses_a_flag_dschat_does_not_define(tmp_path):
    run = tunelab("import-dschat", "--out", tmp_path / "x.yaml", "--", *STEP3, "--bogus", "1",
                  timeout=60)  # fmt: skip
    assert run.returncode == 2
    assert run.stderr == ("tunelab: error: DeepSpeed-Chat step-3 flags: unrecognized arguments: "
                          "--bogus 1\n")  # fmt: skip
    assert not (tmp_path / "x.yaml").exists()
