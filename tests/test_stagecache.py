"""The stage cache: keys hold what determines a stage's weights; a trial started from cached
SFT and RM weights begins PPO exactly where the trial that trained them did, and one that also
reads PPO's start evaluation from the cache runs the same PPO."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tunelab.config import load_config
from tunelab.stagecache import (
    START,
    claim_age_s,
    claim_file,
    is_complete,
    refresh_claim,
    release_claim,
    reuse_metrics,
    stage_key,
    stage_plan,
    start_key,
    try_claim,
)

from .conftest import TINY


def test_keys_follow_what_determines_the_weights(tmp_path):
    base = load_config(TINY)
    key = stage_key(base, "sft")
    # How a stage runs does not change what it computes.
    for same in (["actor.zero_stage=3"], ["actor.offload_optimizer=cpu"],
                 ["actor.gradient_checkpointing=true"], ["ppo.kl_coef=0.3"],
                 ["critic.lora_rank=8"], ["rm.steps=7"]):  # fmt: skip
        assert stage_key(load_config(TINY, same), "sft") == key, same
    for other in (["sft.learning_rate=1e-3"], ["actor.lora_rank=8"], ["seed=5"],
                  ["precision=fp32"], ["batch.train_micro=8", "batch.generation_micro=16"],
                  ["ppo.max_answer_len=12"], ["actor.dropout=0.1"], ["eval_seed=3"]):  # fmt: skip
        assert stage_key(load_config(TINY, other), "sft") != key, other
    assert stage_key(base, "rm") != stage_key(load_config(TINY, ["critic.lora_rank=8"]), "rm")
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 4)
    first = stage_key(load_config(TINY, [f"data.source={data}"]), "rm")
    os.utime(data, ns=(1, 1))  # a changed file is new data
    assert stage_key(load_config(TINY, [f"data.source={data}"]), "rm") != first


def test_the_start_key_leaves_out_only_what_ppo_steps_read():
    base = load_config(TINY)
    keys = [stage_key(base, stage) for stage in ("sft", "rm")]
    key = start_key(base, keys)
    for same in (["ppo.kl_coef=0.3"], ["ppo.clip_range=0.1"], ["ppo.value_clip_range=0.1"],
                 ["ppo.lam=0.9"], ["ppo.gamma=0.9"], ["ppo.epochs=3"], ["ppo.steps=7"],
                 ["ppo.generation_batches=2"], ["ppo.reward_clip=2.0"],
                 ["actor.learning_rate=1e-2"], ["critic.learning_rate=1e-2"],
                 ["actor.lora_learning_rate=1e-2"], ["warmup_steps=3"]):  # fmt: skip
        assert start_key(load_config(TINY, same), keys) == key, same
    for other in (["ppo.max_answer_len=12"], ["ppo.min_answer_len=10"], ["ppo.temperature=0.7"],
                  ["ppo.decoding=greedy"], ["eval_seed=3"], ["batch.generation_micro=32"],
                  ["actor.zero_stage=3"], ["precision=fp32"], ["data.eval_size=64"],
                  ["actor.lora_rank=8"]):  # fmt: skip
        assert start_key(load_config(TINY, other), keys) != key, other
    assert start_key(base, [keys[0], "another reward model"]) != key


def test_keys_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """A preset on synthetic data names no files: what else lies where a study is run from
    (a changing repository, other studies' output) must not change the key."""
    config = load_config(TINY)
    monkeypatch.chdir(tmp_path)
    keys = {stage: stage_key(config, stage) for stage in ("sft", "rm")}
    (tmp_path / "unrelated.txt").write_text("changes between trials")
    assert {stage: stage_key(config, stage) for stage in ("sft", "rm")} == keys


def test_only_stages_a_study_does_not_measure_are_planned(tmp_path):
    config = load_config(TINY)
    assert stage_plan(config, tmp_path, ("sft", "rm", "ppo")) == {}
    assert set(stage_plan(config, tmp_path, ("rm", "ppo"))) == {"sft"}
    given = load_config(TINY, ["sft.steps=0"])
    assert set(stage_plan(given, tmp_path, ("ppo",))) == {"rm"}
    assert set(stage_plan(config, tmp_path, ("ppo",))) == {"sft", "rm", START}


def test_reuse_metrics_name_what_a_plan_loads(tmp_path):
    plan = stage_plan(load_config(TINY), tmp_path, ("ppo",))
    assert reuse_metrics(plan) == {}
    loads = {stage: {**entry, "action": "load"} for stage, entry in plan.items()}
    assert reuse_metrics(loads) == {"sft/reused": 1, "rm/reused": 1, "ppo/start_reused": 1}
    assert reuse_metrics({**loads, START: plan[START]}) == {"sft/reused": 1, "rm/reused": 1}


def test_cached_stages_start_ppo_where_the_training_trial_did(tmp_path, monkeypatch):
    from tunelab.launcher import cpu_threads, launch_trial

    config = load_config(TINY, ["sft.steps=12", "rm.steps=12", "ppo.steps=4"])
    cache = tmp_path / "cache"
    saving = stage_plan(config, cache, ("ppo",))
    assert {entry["action"] for entry in saving.values()} == {"save"}
    fresh = launch_trial(config, tmp_path / "fresh", stage_plan=saving, timeout_s=300)
    assert fresh.status == "ok", fresh.reason
    loading = stage_plan(config, cache, ("ppo",))
    assert {entry["action"] for entry in loading.values()} == {"load"}
    # Threads: the suite's OMP_NUM_THREADS (conftest) is kept; without one, the launcher's.
    monkeypatch.delenv("OMP_NUM_THREADS")
    # PPO's start evaluated again, from the cached weights (its entry saved elsewhere).
    again = {**loading, START: {**loading[START], "action": "save",
                                "path": str(tmp_path / "elsewhere.json")}}  # fmt: skip
    records = []
    reused = launch_trial(config, tmp_path / "reused", stage_plan=again, timeout_s=300,
                          on_progress=records.append)  # fmt: skip
    assert records and not any("ppo/start_reused" in r for r in records)
    assert reused.status == "ok", reused.reason
    assert fresh.metrics["trial/cpu_threads"] == 1
    cores = len(os.sched_getaffinity(0))
    assert reused.metrics["trial/cpu_threads"] == cpu_threads(ranks=1) == cores
    result = json.loads((tmp_path / "reused" / "metrics.json").read_text())
    assert result["stages"]["sft"]["source"] == "reused"
    assert result["stages"]["rm"]["trained_by"] == str(tmp_path / "fresh")
    assert reused.metrics["sft/reused"] == reused.metrics["rm/reused"] == 1
    for name in ("sft/loss_final", "rm/eval_accuracy", "ppo/score_start", "ppo/gold_start"):
        assert reused.metrics[name] == fresh.metrics[name], name
    assert "time/sft_s" in reused.metrics  # the cached stage's figures, marked as reused
    assert "mem/sft/peak_host_rss_bytes" not in reused.metrics  # not run here
    assert "ppo/start_reused" not in reused.metrics
    saved = json.loads(Path(loading[START]["path"]).read_text())
    assert saved == json.loads((tmp_path / "elsewhere.json").read_text())
    assert saved == {"score": fresh.metrics["ppo/score_start"],
                     "gold": fresh.metrics["ppo/gold_start"]}  # fmt: skip
    # The start read from the cache: no start evaluation, and the same PPO after it. Planned
    # as `save`: the entry was written after the plan was made (by the trial whose SFT and RM
    # this one waited for), and the trial reads it all the same.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    written_since = {**loading, START: {**loading[START], "action": "save"}}
    records = []
    started = launch_trial(config, tmp_path / "started", stage_plan=written_since,
                           timeout_s=300, on_progress=records.append)  # fmt: skip
    assert started.status == "ok", started.reason
    assert started.metrics["ppo/start_reused"] == 1
    # Its progress records say so from PPO's first step: a trial stopped there counts it too.
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(r["ppo/start_reused"] == 1 for r in records)
    assert reuse_metrics(written_since)["sft/reused"] == 1
    assert "ppo/start_reused" not in reuse_metrics(written_since)
    assert reuse_metrics(written_since, start_read=True)["ppo/start_reused"] == 1
    for name in ("ppo/score_start", "ppo/gold_start", "ppo/score_end", "ppo/gold_end",
                 "ppo/kl_final", "ppo/value_loss_final", "ppo/policy_loss_final"):  # fmt: skip
        assert started.metrics[name] == fresh.metrics[name], name


def test_one_trial_at_a_time_holds_an_entrys_claim(tmp_path):
    entry = tmp_path / "cache" / "sft-abc"
    assert try_claim(entry, "host:1:2 trial 0") is None  # the first one trains it
    assert try_claim(entry, "host:1:2 trial 1") == "host:1:2 trial 0"
    release_claim(entry, "host:1:2 trial 1")  # not its claim: kept
    assert try_claim(entry, "host:1:2 trial 1") == "host:1:2 trial 0"
    release_claim(entry, "host:1:2 trial 0")
    assert not claim_file(entry).exists() and not is_complete(entry)
    assert try_claim(entry, "host:1:2 trial 1") is None
    (entry / "weights.pt").parent.mkdir()
    (entry / "weights.pt").write_bytes(b"")
    assert not is_complete(entry)  # no stage.json yet
    (entry / "stage.json").write_text("{}")
    assert is_complete(entry)


def test_a_claim_is_never_seen_empty_and_dropping_a_stale_one_keeps_a_fresh_one(tmp_path):
    entry = tmp_path / "cache" / "rm-abc"
    assert try_claim(entry, "host:1:2 trial 0") is None
    assert claim_file(entry).read_text() == "host:1:2 trial 0"
    assert [p.name for p in entry.parent.iterdir()] == ["rm-abc.claim"]  # no draft left
    # A worker that judged "trial 0" stale drops only that claim: when another trial has
    # claimed the entry in between, its claim stays, with its name.
    release_claim(entry, "host:1:2 trial 0")
    assert try_claim(entry, "host:3:4 trial 5") is None
    assert not release_claim(entry, "host:1:2 trial 0")
    assert claim_file(entry).read_text() == "host:3:4 trial 5"
    assert [p.name for p in entry.parent.iterdir()] == ["rm-abc.claim"]
    assert release_claim(entry, "host:3:4 trial 5") and claim_age_s(entry) is None


def test_heartbeats_keep_a_claim_young(tmp_path):
    entry = tmp_path / "sft-abc"
    try_claim(entry, "host:1:2 trial 0")
    os.utime(claim_file(entry), (0, 0))
    assert claim_age_s(entry) > 10**9
    refresh_claim(entry)
    assert claim_age_s(entry) < 60
