"""Whole SFT -> RM -> PPO trials on real DeepSpeed engines, in this process (one rank).

The tiny preset makes each trial take seconds on the CPU; assertions are on measured values.
"""

from __future__ import annotations

import json
import statistics

import pytest

from tunelab.data import gold_reward
from tunelab.devices import cpu_supports_fp16

LOOP_CASES = {
    "zero0": ["actor.zero_stage=0", "critic.zero_stage=0"],
    "zero1-greedy": ["actor.zero_stage=1", "critic.zero_stage=1", "ppo.decoding=greedy"],
    "zero3": ["actor.zero_stage=3", "critic.zero_stage=3"],
    "zero3-lora-checkpointing": [
        "actor.zero_stage=3", "critic.zero_stage=3", "actor.lora_rank=8", "critic.lora_rank=8",
        "actor.gradient_checkpointing=true", "critic.gradient_checkpointing=true",
    ],
    "zero2-optimizer-offload": ["actor.offload_optimizer=cpu", "critic.offload_optimizer=cpu"],
    "zero3-param-offload-frozen-offload": [
        "actor.zero_stage=3", "critic.zero_stage=3", "actor.offload_params=cpu",
        "critic.offload_optimizer=cpu", "offload_reference=true", "offload_reward=true",
        "precision=fp32",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def default_trial(in_process_trials, tmp_path_factory):
    """The shipped tiny config (ZeRO-2, bf16), run once for several tests."""
    from tunelab.config import load_config

    from ..conftest import TINY

    out = tmp_path_factory.mktemp("default")
    return in_process_trials(load_config(TINY), out), out


def test_default_trial_writes_metrics_json(default_trial):
    result, out = default_trial
    assert result["status"] == "ok", result["reason"]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["status"] == "ok"
    assert on_disk["metrics"] == pytest.approx(result["metrics"])
    assert on_disk["config"]["actor"]["zero_stage"] == 2
    assert len(on_disk["series"]["ppo/gold"]) == 20
    assert (out / "rank0.json").exists()
    progress = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert [p["step"] for p in progress] == list(range(20))
    # Throughput after the 2 warm-up steps; score, gold and KL from the first step, each the mean
    # of the last (up to) 5 steps' values in the trial's series.
    assert [p["step"] for p in progress if "perf/ppo_e2e_tokens_per_s" in p] == list(range(2, 20))
    assert all(p.get("perf/ppo_e2e_tokens_per_s", 1) > 0 for p in progress)
    series = on_disk["series"]
    # Before the first update the actor is the reference: the same weights, scored with the
    # same attention kernel (training_attention), so the first step's KL is exactly 0.
    assert series["ppo/kl"][0] == 0.0
    for name in ("ppo/gold", "ppo/score", "ppo/kl"):
        recent = [p[f"{name}_recent"] for p in progress]
        assert recent == pytest.approx(
            [statistics.fmean(series[name][max(0, s - 4) : s + 1]) for s in range(20)]
        )
    # The host peak so far (stop lines): it only grows and ends at most at the final peak. A CPU
    # trial has no device peaks.
    so_far = [p["mem/peak_host_rss_so_far_bytes"] for p in progress]
    assert so_far == sorted(so_far)
    assert 0 < so_far[-1] <= on_disk["metrics"]["mem/peak_host_rss_bytes"]
    assert not any("device" in key for p in progress for key in p)


def test_predicted_and_measured_memory_side_by_side(default_trial):
    result, _ = default_trial
    metrics = result["metrics"]
    for engine in ("sft", "rm", "actor", "critic", "reference", "reward"):
        predicted = metrics[f"mem/{engine}/predicted_model_states_bytes"]
        measured = metrics[f"mem/{engine}/measured_model_states_bytes"]
        assert predicted == pytest.approx(measured, rel=0.10), engine
    for stage in ("sft", "rm", "ppo_generate", "ppo_experience", "ppo_train"):
        assert metrics[f"mem/{stage}/predicted_device_peak_bytes"] > 0
        assert metrics[f"mem/{stage}/peak_host_rss_bytes"] > 0
    assert set(result["memory"]["measured"]) == {
        "sft",
        "rm",
        "actor",
        "critic",
        "reference",
        "reward",
    }
    assert result["memory"]["predicted"]["ranks"] == 1


def test_end_of_ppo_answers_are_kept_decoded(default_trial):
    """A few answers of the end evaluation, as text, with their rewards (what a user reads
    before trusting a reward)."""
    result, out = default_trial
    samples = json.loads((out / "metrics.json").read_text())["samples"]
    assert samples == result["samples"] and len(samples) == 3
    for sample in samples:
        assert sample["prompt"].startswith("review of")
        assert sample["answer"].strip() and "[PAD]" not in sample["answer"]
        assert -1.0 <= sample["gold"] <= 1.0 and isinstance(sample["score"], float)
        assert sample["gold"] == pytest.approx(gold_reward(sample["answer"]))


def test_nonpad_throughput_sits_below_the_padded_one(default_trial):
    """Answers end at eos and prompts are left-padded: fewer real tokens than positions."""
    from tunelab.metrics import is_metric_name

    metrics = default_trial[0]["metrics"]
    assert [name for name in metrics if not is_metric_name(name)] == []
    for phase in ("ppo_generate", "ppo_experience", "ppo_train", "ppo_e2e"):
        nonpad = metrics[f"perf/{phase}_nonpad_tokens_per_s"]
        assert 0 < nonpad < metrics[f"perf/{phase}_tokens_per_s"], phase
    # Generation's real tokens per answer: the mean answer length (warm-up steps included).
    generate = "perf/ppo_generate_nonpad_tokens_per_s", "perf/ppo_generate_samples_per_s"
    per_answer = metrics[generate[0]] / metrics[generate[1]]
    assert per_answer == pytest.approx(metrics["ppo/answer_tokens_mean"], rel=0.1)


def test_reward_model_is_clearly_above_chance(default_trial):
    metrics = default_trial[0]["metrics"]
    assert metrics["rm/eval_accuracy"] >= 0.8  # 256 held-out pairs; chance is 0.5
    assert metrics["rm/eval_accuracy"] > metrics["rm/eval_accuracy_start"] + 0.2
    assert metrics["rm/loss_final"] < 0.5 < metrics["rm/loss_first"]


def test_ppo_raises_gold_reward_by_a_real_margin(default_trial):
    metrics = default_trial[0]["metrics"]
    # Gold reward lies in [-1, 1]; 256 held-out prompts give a standard error near 0.02.
    assert metrics["ppo/gold_gain"] >= 0.15
    assert metrics["ppo/gold_end"] == pytest.approx(
        metrics["ppo/gold_start"] + metrics["ppo/gold_gain"]
    )
    assert metrics["ppo/score_gain"] > 0
    assert metrics["ppo/kl_final"] > 0  # the policy moved away from the reference


def test_phase_times_add_up(default_trial):
    metrics = default_trial[0]["metrics"]
    parts = sum(metrics[f"time/ppo_{p}_s"] for p in ("generate", "experience", "train"))
    assert parts <= metrics["time/ppo_e2e_s"] * 1.001
    assert parts >= metrics["time/ppo_e2e_s"] * 0.8  # batching between phases is small
    assert metrics["time/ppo_dschat_e2e_s"] < metrics["time/ppo_step_s"]  # leaves out experience


@pytest.mark.parametrize("case", list(LOOP_CASES))
def test_whole_loop_runs(in_process_trials, tiny_config, tmp_path, case):
    result = in_process_trials(tiny_config(*LOOP_CASES[case]), tmp_path)
    assert result["status"] == "ok", result["reason"]
    metrics = result["metrics"]
    # LoRA adapts a random base through rank-8 deltas only, so it learns less in 40 steps.
    assert metrics["sft/loss_final"] < metrics["sft/loss_first"] - (0.2 if "lora" in case else 1.0)
    assert metrics["rm/eval_accuracy"] >= 0.7
    assert metrics["ppo/steps"] == 20
    assert metrics["perf/ppo_e2e_tokens_per_s"] > 0
    assert metrics["mem/ppo_train/peak_host_rss_bytes"] > 0


def test_hybrid_engine_is_unsupported_at_once(in_process_trials, tiny_config, tmp_path):
    result = in_process_trials(tiny_config("hybrid_engine=true"), tmp_path)
    assert result["status"] == "unsupported"
    assert "hybrid engine" in result["reason"]
    assert "sft/loss_final" not in result["metrics"]  # ended before any stage
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "unsupported"


FP16_CASE = ["precision=fp16", "sft.steps=8", "rm.steps=8", "ppo.steps=8"]


@pytest.mark.skipif(not cpu_supports_fp16(), reason="this CPU has no AVX512-FP16/AMX-FP16")
def test_fp16_overflow_steps_stay_out_of_throughput(in_process_trials, tiny_config, tmp_path):
    """DeepSpeed's dynamic loss scaling starts at 2^16 and skips the optimizer steps that
    overflow (DeepSpeed-Chat's OPT-1.3b log skips PPO steps 0-2); the tiny model's RM and critic
    overflow too. Those steps do less work, so throughput leaves them out."""
    result = in_process_trials(tiny_config(*FP16_CASE), tmp_path)
    assert result["status"] == "ok", result["reason"]
    metrics, series = result["metrics"], result["series"]
    skipped = sum(
        metrics[k]
        for k in (
            "sft/skipped_steps",
            "rm/skipped_steps",
            "ppo/actor_skipped_steps",
            "ppo/critic_skipped_steps",
        )
    )
    assert skipped > 0
    for stage, phase in (("sft", "sft"), ("rm", "rm"), ("ppo", "ppo_step")):
        flags, times = series[f"{stage}/skipped"], series[f"time/{phase}_s"]
        assert sum(flags) == len([f for f in flags if f])  # one flag per step
        timed = [t for step, (t, f) in enumerate(zip(times, flags, strict=True))
                 if step >= 2 and not f]  # fmt: skip
        e2e = "time/ppo_e2e_s" if stage == "ppo" else f"time/{stage}_s"
        assert metrics[e2e] == pytest.approx(sum(timed))
    assert metrics["ppo/timed_steps"] == 8 - 2 - sum(series["ppo/skipped"][2:])
    assert metrics["rm/skipped_steps"] == sum(series["rm/skipped"])


def test_a_stage_with_every_timed_step_skipped_fails_clearly():
    from tunelab.errors import TrialFailure
    from tunelab.pipeline.telemetry import timed_steps

    assert timed_steps("ppo", 6, 2, {0, 1, 2, 4}) == [3, 5]
    with pytest.raises(TrialFailure, match="every step after the 2 warm-up steps"):
        timed_steps("rm", 4, 2, {2, 3})


def test_absurd_learning_rate_diverges(in_process_trials, tiny_config, tmp_path):
    result = in_process_trials(tiny_config("sft.learning_rate=1e6"), tmp_path)
    assert result["status"] == "diverged"
    assert "non-finite loss at sft step" in result["reason"]


def test_clip_range_acts_from_the_second_ppo_epoch(in_process_trials, tiny_config, tmp_path):
    """One epoch of one micro-batch leaves the ratio at exactly 1 (clip_fraction 0, as in every
    trial before the shipped studies asked for 2 epochs); the second epoch starts from updated
    weights, so some tokens leave the clip range."""
    short = ["sft.steps=3", "rm.steps=3", "ppo.steps=3", "data.eval_size=16"]
    result = in_process_trials(tiny_config(*short, "ppo.epochs=2"), tmp_path)
    assert result["status"] == "ok", result["reason"]
    assert result["metrics"]["ppo/clip_fraction"] > 0
