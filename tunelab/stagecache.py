"""Content-addressed cache of trained SFT and reward-model stages, shared by a study's trials.

A study that does not measure a stage (spec `measure`, e.g. `[ppo]` for PPO-coefficient and
step-3 system studies) trains it once per distinct key and lets every later trial start at PPO
from the cached weights, reporting the cached stage's metrics marked as reused. The key holds
exactly what determines the stage's weights: the model source (and a fingerprint of a
checkpoint folder), the data (and a fingerprint of its files), the stage's steps and learning
rate, the seed, precision, ranks, batch sizes, sequence lengths, and the engine's LoRA and
dropout settings. ZeRO stage, offload and checkpointing change how a stage runs, not what it
computes, so they are left out: their effect is what a measured stage is for.

PPO's start evaluation (the held-out reward-model score and gold reward of the SFT policy,
before any PPO step) follows from those two entries and the settings it reads, so a trial that
both loads or saves keeps it too (`ppo_start-<key>.json`, START): one trial evaluates it, the
next ones with the same key read it (`ppo/start_reused`). Its key is the two stage keys and
the whole trial config but what only PPO's steps read (AFTER_START): coefficients, learning
rates, step counts. ZeRO stage, offload and the rest stay in it: a start evaluated under other
engine settings is not taken for this one's.

Entries are folders `<cache>/<stage>-<key>/` holding `weights.pt` (the hand-off state dict),
`stage.json` (metrics, series, what produced it); a trial writes one under a temporary name
and renames it into place, so a half-written entry is never read. Before launching a trial
that would train an entry, the orchestrator claims it (`<stage>-<key>.claim`, created
exclusively, naming the trial, refreshed with each heartbeat): a second worker of the same study
folder then waits for that entry instead of training the same stage again, and trains it itself
if the claimant's trial ends without it. Pure: no torch here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from tunelab._files import private_name, write_atomic, write_once
from tunelab.config import EngineConfig, TrialConfig
from tunelab.records import STAGES as PIPELINE_STAGES

STAGES = PIPELINE_STAGES[:-1]  # the stages that can be reused: all but PPO, always run
FORMAT = 2  # bumped when what an entry holds, or how a stage trains, changes
_ROLE = {"sft": "actor", "rm": "critic"}
WEIGHTS, RECORD = "weights.pt", "stage.json"
STAGE_CACHE = "stage-cache"  # the cache's folder in a study's output folder
START = "ppo_start"  # the plan's entry for PPO's start evaluation
START_REUSED = "ppo/start_reused"  # the metric of a trial that read PPO's start from the cache
# What only PPO's steps read, after its start evaluation (per config section; "" the top):
# trials that differ in these alone evaluate the same start.
AFTER_START = {
    "ppo": ("steps", "kl_coef", "clip_range", "value_clip_range", "gamma", "lam", "epochs",
            "generation_batches", "reward_clip"),
    "actor": ("learning_rate", "lora_learning_rate"),
    "critic": ("learning_rate", "lora_learning_rate"),
    "": ("warmup_steps", "tracker", "peak_tflops"),
}  # fmt: skip


def _fingerprint(location: str) -> Any:
    """Size and modification time of every file under a local path (a checkpoint or data
    folder or file), so a changed file gives a new key; None for presets and hub names."""
    path = Path(location).expanduser()
    if not location or not path.exists():  # Path("") is the working directory
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(f.relative_to(path)) if f != path else f.name, f.stat().st_size,
             f.stat().st_mtime_ns) for f in files]  # fmt: skip


def _engine_math(engine: EngineConfig) -> dict[str, Any]:
    return {"lora_rank": engine.lora_rank, "lora_modules": list(engine.lora_modules),
            "lora_scaling": engine.lora_scaling, "lora_learning_rate": engine.lora_learning_rate,
            "dropout": engine.dropout}  # fmt: skip


def stage_key(config: TrialConfig, stage: str) -> str:
    """The cache key of a trained stage (see the module docstring for what it holds)."""
    role = _ROLE[stage]
    source = getattr(config.models, role)
    data = config.data
    content = {
        "format": FORMAT, "stage": stage, "source": source, "source_files": _fingerprint(source),
        "data": [data.source, data.train_size, data.eval_size, data.eval_source,
                 config.eval_seed],
        "data_files": [_fingerprint(s) for s in (data.source, data.eval_source) if s],
        # The tokenizer of a preset is trained on the data; of a checkpoint, it is the actor's.
        "tokenizer": config.models.actor,
        "training": [getattr(config, stage).steps, getattr(config, stage).learning_rate],
        "seed": config.seed, "precision": config.precision, "ranks": config.ranks,
        "batch": [config.batch.train_micro, config.batch.grad_accum],
        "lengths": [config.ppo.max_prompt_len, config.ppo.max_answer_len],
        "engine": _engine_math(getattr(config, role)),
    }  # fmt: skip
    blob = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def start_key(config: TrialConfig, stage_keys: list[str]) -> str:
    """The key of PPO's start evaluation from the SFT and RM entries `stage_keys` (see the
    module docstring)."""
    settings = config.to_dict()
    for section, names in AFTER_START.items():
        for name in names:
            (settings[section] if section else settings).pop(name)
    blob = json.dumps({"format": FORMAT, "stages": stage_keys, "config": settings},
                      sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def stage_plan(config: TrialConfig, cache: Path, measure: tuple[str, ...]) -> dict[str, dict]:
    """What a trial does with each stage it need not measure: `load` a complete cache entry,
    or train the stage and `save` it. Stages measured, or given (0 steps), are not planned.
    With SFT and RM both planned, PPO's start evaluation is too (START)."""
    plan = {}
    for stage in STAGES:
        if stage in measure or getattr(config, stage).steps == 0:
            continue
        key = stage_key(config, stage)
        path = cache / f"{stage}-{key}"
        plan[stage] = {"action": "load" if is_complete(path) else "save", "path": str(path),
                       "key": key}  # fmt: skip
    if all(stage in plan for stage in STAGES):
        key = start_key(config, [plan[stage]["key"] for stage in STAGES])
        path = cache / f"{START}-{key}.json"
        plan[START] = {"action": "load" if path.is_file() else "save", "path": str(path),
                       "key": key}  # fmt: skip
    return plan


def save_start(path: Path, start: dict[str, float]) -> None:
    """Keep a start evaluation's figures (whole or not at all: write_atomic); a later
    evaluation of the same key replaces them with the same figures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(start))


def read_start(path: Path) -> dict[str, float]:
    return json.loads(path.read_text())


def is_complete(entry: Path) -> bool:
    return (entry / RECORD).is_file() and (entry / WEIGHTS).is_file()


def claim_file(entry: Path) -> Path:
    return entry.with_name(entry.name + ".claim")


def try_claim(entry: Path, owner: str) -> str | None:
    """Claim the training of `entry` for `owner`: None when it is now `owner`'s, else who holds
    it ("" when it was released meanwhile: ask again); never seen empty (write_once)."""
    claim = claim_file(entry)
    claim.parent.mkdir(parents=True, exist_ok=True)
    return write_once(claim, owner)


def release_claim(entry: Path, owner: str) -> bool:
    """Drop the claim on `entry` if `owner` holds it (its own, or a stale one's); whether it did.
    The claim is moved aside first (of two processes dropping one stale claim, one move wins),
    then removed if it was `owner`'s, else put back: a claim taken in between is not lost
    (unless a third claimant linked one in that instant; then both train it, and the first
    finished entry wins)."""
    claim = claim_file(entry)
    aside = private_name(claim, "released")
    try:
        os.rename(claim, aside)
    except FileNotFoundError:
        return False
    try:
        if aside.read_text() == owner:
            return True
        with contextlib.suppress(FileExistsError):
            os.link(aside, claim)
        return False
    finally:
        aside.unlink(missing_ok=True)


def claim_age_s(entry: Path) -> float | None:
    """Seconds since the claim on `entry` was made or last refreshed (None: no claim)."""
    try:
        return time.time() - claim_file(entry).stat().st_mtime
    except FileNotFoundError:
        return None


def refresh_claim(entry: Path) -> None:
    """Mark the claim on `entry` alive (its holder's orchestrator does so with each heartbeat)."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(claim_file(entry))


def reused_stages(plan: dict[str, dict]) -> list[str]:
    """The stages a trial of `plan` loads from the cache instead of running."""
    return [stage for stage in STAGES if plan.get(stage, {}).get("action") == "load"]


def reuse_metrics(plan: dict[str, dict], start_read: bool = False) -> dict[str, int]:
    """What a trial of `plan` loaded from the cache, as its metrics say it: `<stage>/reused`,
    and START_REUSED for PPO's start when the plan loads it or the trial read it all the same
    (`start_read`: another trial wrote it after the plan was made; the trial's progress
    records say so, so a trial stopped early counts it too)."""
    metrics = {f"{stage}/reused": 1 for stage in reused_stages(plan)}
    if start_read or plan.get(START, {}).get("action") == "load":
        metrics[START_REUSED] = 1
    return metrics
