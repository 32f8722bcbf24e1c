"""`tunelab trial` as users run it: a subprocess per trial, files as the interface."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from .conftest import ROOT, TINY

REQUIRED_METRICS = [
    *(f"{prefix}{stage}{suffix}" for stage in ("sft", "rm") for prefix, suffix in [
        ("time/", "_s"), ("perf/", "_samples_per_s"), ("perf/", "_tokens_per_s"),
        ("perf/", "_tflops_per_rank"), ("", "/steps"),
    ]),
    "ppo/steps", "time/ppo_generate_s", "perf/ppo_generate_latency_s",
    "perf/ppo_generate_per_token_latency_s", "perf/ppo_generate_tokens_per_s",
    "perf/ppo_generate_tflops_per_rank", "time/ppo_experience_s",
    "perf/ppo_experience_tflops_per_rank",
    "time/ppo_train_s", "perf/ppo_train_tflops_per_rank", "time/ppo_e2e_s", "time/ppo_step_s",
    "perf/ppo_e2e_samples_per_s", "perf/ppo_e2e_tokens_per_s", "perf/ppo_e2e_tflops_per_rank",
    "time/ppo_dschat_e2e_s", "time/trial_s", "time/process_s",
    "mem/peak_host_rss_bytes", "mem/sft/peak_host_rss_bytes", "mem/rm/peak_host_rss_bytes",
    "mem/ppo_generate/peak_host_rss_bytes", "mem/ppo_train/peak_host_rss_bytes",
    "mem/actor/predicted_model_states_bytes", "mem/actor/measured_model_states_bytes",
    "mem/ppo_train/predicted_device_peak_bytes", "mem/predicted_device_peak_bytes",
    "sft/loss_final", "rm/eval_accuracy", "ppo/score_start", "ppo/score_end", "ppo/gold_start",
    "ppo/gold_end", "ppo/kl_final", "ppo/clip_fraction", "ppo/value_loss_final",
]  # fmt: skip


def tunelab(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "tunelab", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


def test_tiny_trial_command_writes_every_metric(tmp_path):
    run = tunelab("trial", TINY, "--out", tmp_path / "t")
    assert run.returncode == 0, run.stderr + run.stdout
    assert run.stdout.startswith("status ok")
    result = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert result["status"] == "ok"
    missing = [name for name in REQUIRED_METRICS if name not in result["metrics"]]
    assert not missing
    assert all(math.isfinite(result["metrics"][name]) for name in REQUIRED_METRICS)
    # The reward model's score and the sampled KL estimate have either sign.
    signed = {"ppo/score_start", "ppo/score_end", "ppo/kl_final"}
    assert all(result["metrics"][name] >= 0 for name in REQUIRED_METRICS if name not in signed)
    assert result["metrics"]["time/process_s"] > result["metrics"]["time/trial_s"]  # + imports
    assert (tmp_path / "t" / "trial.log").stat().st_size > 0


def test_two_rank_zero2_trial(tmp_path):
    out = tmp_path / "two"
    run = tunelab(
        "trial", TINY, "--out", out, "ranks=2", "batch.train_micro=8",
        "batch.generation_micro=8", "batch.train_global=16",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + (out / "trial.log").read_text()[-3000:]
    result = json.loads((out / "metrics.json").read_text())
    assert result["metrics"]["trial/ranks"] == 2
    assert [r["rank"] for r in result["ranks"]] == [0, 1]
    per_rank = [r["mem/peak_host_rss_bytes"] for r in result["ranks"]]
    assert result["metrics"]["mem/peak_host_rss_bytes"] == max(per_rank)
    # Its running peaks (max over both ranks, one collective per PPO step) never pass it.
    progress = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    so_far = [p["mem/peak_host_rss_so_far_bytes"] for p in progress]
    assert so_far == sorted(so_far) and 0 < so_far[-1] <= max(per_rank)
    assert "torch.distributed.run" in (out / "trial.log").read_text().splitlines()[0]
    assert result["metrics"]["rm/eval_accuracy"] >= 0.8


def test_unsupported_trial_exits_1_with_status(tmp_path):
    run = tunelab("trial", TINY, "--out", tmp_path / "f", "hybrid_engine=true")
    assert run.returncode == 1
    assert run.stdout.startswith("status unsupported: DeepSpeed 0.19's hybrid engine")


@pytest.mark.parametrize("generation", ["gather_once", "per_layer"])
def test_two_rank_zero3_trial_with_answers_of_any_length(generation, tmp_path):
    """Sampled answers of 1-10 tokens in batches of 2 rows: ranks finish generation at
    different lengths (before ZeRO-3 generation was made rank-safe this trial hung). Per layer,
    DeepSpeed keeps the small parameters it gathered while decoding, and training then saves
    them for backward (decoding under inference mode failed there)."""
    out = tmp_path / "z3"
    run = tunelab(
        "trial", TINY, "--out", out, "ranks=2", "actor.zero_stage=3", "critic.zero_stage=3",
        "batch.train_micro=2", "batch.generation_micro=2", "ppo.steps=8",
        f"ppo.zero3_generation={generation}", "--timeout", "240",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + (out / "trial.log").read_text()[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["ppo/answer_tokens_mean"] < 9.5  # answers ended before the 10-token limit
    # Partitioned from construction: each rank's engines hold half of each model.
    for role in ("actor", "critic", "reference", "reward"):
        assert metrics[f"model/{role}/parameters"] > 0
    assert metrics["mem/actor/measured_model_states_bytes"] == pytest.approx(
        metrics["mem/actor/predicted_model_states_bytes"], rel=0.1
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["actor.zero_stag=2"], "actor.zero_stag: unknown key (did you mean 'zero_stage'?)"),
        (["ppo.kl_coef=high"], "ppo.kl_coef: expected float, got 'high'"),
        (["ranks=2", "batch.train_global=16"], "batch.train_global: 16 but"),
        (
            ["data.source=/nonexistent/pairs.jsonl"],
            "data file /nonexistent/pairs.jsonl: not found",
        ),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    run = tunelab("trial", TINY, "--out", tmp_path / "x", *args, timeout=60)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1, run.stderr
    assert message in run.stderr
    assert run.stderr.startswith("tunelab: error: ")
    assert not (tmp_path / "x").exists()  # nothing launched


def test_malformed_data_file_names_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n')
    run = tunelab("trial", TINY, "--out", tmp_path / "x", f"data.source={data}", timeout=60)
    assert run.returncode == 2
    assert f"{data}:2: not valid JSON" in run.stderr


def test_orchestrator_modules_never_import_torch():
    """Every module outside tunelab.pipeline (the orchestrating side) imports without torch."""
    package = ROOT / "tunelab"
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in package.rglob("*.py")
        if "pipeline" not in path.relative_to(package).parts and path.name != "__main__.py"
    )
    assert {"tunelab.study", "tunelab.export", "tunelab.report.build"} <= set(modules)
    code = (
        f"import sys, {', '.join(modules)}\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
