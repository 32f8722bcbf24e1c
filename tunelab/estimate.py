"""`tunelab estimate`: the memory model as tables a person reads before launching (no torch).

Tables are pure functions returning pandas DataFrames; the CLI prints them.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from tunelab.config import EngineConfig, TrialConfig
from tunelab.memory import MemoryPrediction, SetupMemory, StageMemory, predict
from tunelab.presets import ModelShape

GIB = 1024**3

# (label, ZeRO stage, optimizer offload, parameter offload) compared by `largest_micro_batch`.
SETTINGS = (
    ("ZeRO-0", 0, "none", "none"),
    ("ZeRO-1", 1, "none", "none"),
    ("ZeRO-1 + optimizer offload", 1, "cpu", "none"),
    ("ZeRO-2", 2, "none", "none"),
    ("ZeRO-2 + optimizer offload", 2, "cpu", "none"),
    ("ZeRO-3", 3, "none", "none"),
    ("ZeRO-3 + optimizer offload", 3, "cpu", "none"),
    ("ZeRO-3 + optimizer and param offload", 3, "cpu", "cpu"),
)


def _stage_rows(name: str, stage: StageMemory) -> list[dict]:
    rows = []
    for role, states in stage.engines.items():
        trains = role in stage.training
        rows.append({
            "stage": name, "item": role,
            "params": states.params.total, "grads": states.grads.total,
            "optimizer": states.optimizer.total, "buffers": states.buffers.total,
            "backward": (states.backward_grads + states.buckets).total if trains else 0,
            "step": states.step_transient.total if trains else 0,
            "device": states.resident.device, "host": states.resident.host,
        })  # fmt: skip
    for role, items in stage.training.items():
        for item, value in items.items():
            if value:
                rows.append({"stage": name, "item": f"{role}: {item}", "device": value})
    for item, value in stage.transient.items():
        if value:
            rows.append({"stage": name, "item": item, "device": value})
    for item, value in stage.host_transient.items():
        rows.append({"stage": name, "item": item, "host": value})
    return rows


def breakdown(prediction: MemoryPrediction) -> pd.DataFrame:
    """One row per (stage, engine) plus the stage's transients and peak, in GiB per rank; the
    setup stage as one row per engine built (its moment's peaks)."""
    rows = []
    for name, stage in prediction.stages.items():
        if isinstance(stage, SetupMemory):
            for moment, memory in stage.moments.items():
                rows.append({
                    "stage": name, "item": f"building {moment}", "device": memory.device_peak,
                    "host": memory.host_peak,
                })  # fmt: skip
        else:
            rows += _stage_rows(name, stage)
        rows.append({
            "stage": name, "item": "PEAK", "device": stage.device_peak, "host": stage.host_peak,
        })  # fmt: skip
    frame = pd.DataFrame(rows).fillna(0)
    columns = ["params", "grads", "optimizer", "buffers", "backward", "step", "device", "host"]
    frame[columns] = frame[columns] / GIB
    return frame[["stage", "item", *columns]]


def _with_setting(config: TrialConfig, stage: int, optimizer: str, params: str) -> TrialConfig:
    def engine(current: EngineConfig) -> EngineConfig:
        return replace(
            current, zero_stage=stage, offload_optimizer=optimizer, offload_params=params
        )

    frozen_offload = params == "cpu"
    return replace(
        config, actor=engine(config.actor), critic=engine(config.critic),
        offload_reference=frozen_offload, offload_reward=frozen_offload,
    )  # fmt: skip


def settings(config: TrialConfig) -> tuple[list[tuple[str, TrialConfig]], list[tuple[str, str]]]:
    """SETTINGS applied to `config`: (label, config) for those its rules allow, and (label,
    reason) for those they refuse (e.g. DeepSpeed-Chat's hybrid engine + ZeRO-2 + offload)."""
    allowed, refused = [], []
    for label, stage, optimizer, params in SETTINGS:
        try:
            allowed.append((label, _with_setting(config, stage, optimizer, params)))
        except ValueError as exc:  # tunelab._typed.Invalid: the config's own checks
            refused.append((label, str(exc)))
    return allowed, refused


def largest_micro_batch(
    config: TrialConfig, actor: ModelShape, critic: ModelShape, budget: int, limit: int = 4096
) -> pd.DataFrame:
    """For each ZeRO stage and offload choice (applied to actor and critic) the config allows,
    the largest micro-batch (training = generation) whose predicted device peak over the whole
    loop fits in `budget` bytes per rank, found by bisection (the peak grows with the batch)."""

    def peak(setting: TrialConfig, micro: int) -> int:
        batch = replace(
            setting.batch, train_micro=micro, generation_micro=micro, train_global=None
        )
        return predict(replace(setting, batch=batch), actor, critic).device_peak

    rows = []
    for label, setting in settings(config)[0]:
        if peak(setting, 1) > budget:
            best = 0
        else:
            low, high = 1, limit
            while low < high:
                middle = (low + high + 1) // 2
                low, high = (
                    (middle, high) if peak(setting, middle) <= budget else (low, middle - 1)
                )
            best = low
        rows.append({
            "setting": label,
            "max micro-batch": best,  # 0: does not fit even at 1
            "device peak at it (GiB)": peak(setting, max(best, 1)) / GIB,
            "host peak (GiB)": predict(setting, actor, critic).host_peak / GIB,
        })  # fmt: skip
    return pd.DataFrame(rows)


def render(config: TrialConfig, actor: ModelShape, critic: ModelShape, names, gpu_mem_gib):
    """The text `tunelab estimate` prints."""
    prediction = predict(config, actor, critic)
    budget = int(gpu_mem_gib * GIB)
    fits = "fits" if prediction.device_peak <= budget else "does NOT fit"
    lines = [
        f"Predicted memory per rank: actor {names[0]} ({actor.num_params() / 1e6:,.1f} M params), "
        f"critic {names[1]} ({critic.num_params(lm_head=False) / 1e6:,.1f} M), "
        f"{config.precision}, {config.ranks} rank(s), micro-batch {config.batch.train_micro}, "
        f"sequence {config.ppo.max_prompt_len}+{config.ppo.max_answer_len}",
        "GiB per rank (rank 0, which also holds the hand-off weights). Engines: params, grads "
        "(between backward and step), optimizer (fp32 master + Adam), buffers; while training,",
        "backward (gradients + reduce buckets at its peak) and step (extra inside "
        "optimizer.step); device/host = held while idle. Trained engines take turns: a PEAK",
        "counts the largest one's backward (with its activations and logits) or step. setup: "
        "each engine as it is built, one at a time, the earlier ones built.",
        "",
        breakdown(prediction).to_string(
            index=False, float_format=lambda v: f"{v:.3f}" if v else ""
        ),
        "",
        f"Whole loop: device peak {prediction.device_peak / GIB:.2f} GiB per rank "
        f"(PyTorch {prediction.device_peak_allocated / GIB:.2f} + "
        f"{prediction.headroom / GIB:.2f} CUDA context/NCCL headroom; {fits} in "
        f"{gpu_mem_gib:g} GiB), host peak {prediction.host_peak / GIB:.2f} GiB per rank",
        "",
        f"Largest micro-batch that fits in {gpu_mem_gib:g} GiB per GPU (actor and critic alike, "
        "headroom included):",
        largest_micro_batch(config, actor, critic, budget)
        .replace({"max micro-batch": {0: "does not fit"}})
        .to_string(index=False, float_format=lambda v: f"{v:.2f}"),
        *(
            f"{label}: not allowed with this config ({reason})"
            for label, reason in settings(config)[1]
        ),
    ]
    return "\n".join(lines)
