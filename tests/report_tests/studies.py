"""Real Optuna studies shaped like tunelab's storage (records.py), for the report tests.

Metric names and magnitudes follow a real `tunelab trial studies/trials/tiny.yaml` run; each
trial is added with `optuna.trial.create_trial`, nothing is mocked.
"""

from __future__ import annotations

import copy

import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from tunelab.records import ENGINES, OBJECTIVES_ATTR, TrialAttr, metric_attrs
from tunelab.report.data import TIMED_PHASES

MIB = 1024**2
GIB = 1024**3
THROUGHPUT = "perf/ppo_e2e_tokens_per_s"
HOST_PEAK = "mem/peak_host_rss_bytes"
DEVICE_PEAK = "mem/peak_device_allocated_bytes"
DISTRIBUTIONS = {
    "actor.zero_stage": IntDistribution(0, 3),
    "actor.offload_optimizer": CategoricalDistribution(["none", "cpu"]),
    "actor.lora_rank": CategoricalDistribution([0, 8]),
    "batch.train_micro": CategoricalDistribution([8, 16]),
}
BASE_CONFIG = {
    "seed": 1234, "ranks": 1, "precision": "bf16",
    "models": {"actor": "tiny", "critic": "tiny"},
    "batch": {"train_micro": 16, "generation_micro": 16, "grad_accum": 1, "train_global": None},
    "actor": {"zero_stage": 2, "offload_optimizer": "none", "offload_params": "none",
              "lora_rank": 0},
    "critic": {"zero_stage": 2, "offload_optimizer": "none", "offload_params": "none",
               "lora_rank": 0},
    "ppo": {"steps": 20},
}  # fmt: skip
BASELINE = "dschat-single-gpu"


def knobs(zero: int, offload: str, lora: int, micro: int) -> dict:
    return {
        "actor.zero_stage": zero, "actor.offload_optimizer": offload, "actor.lora_rank": lora,
        "batch.train_micro": micro,
    }  # fmt: skip


def config_with(params: dict) -> dict:
    """BASE_CONFIG with dotted params applied (what the orchestrator stores as "config")."""
    config = copy.deepcopy(BASE_CONFIG)
    for dotted, value in params.items():
        *path, last = dotted.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return config


def predicted(number: int) -> dict:
    """The flat memory prediction made before launch (mem/predicted_device_peak_bytes)."""
    return {"mem/predicted_device_peak_bytes": (9 + number) * MIB}


def metrics(number: int, tokens_per_s: float, peak_bytes: float, gpu: bool) -> dict:
    """A full metrics dict of a completed trial; per-stage figures vary with `number`."""
    result = {
        THROUGHPUT: tokens_per_s,
        "perf/ppo_e2e_samples_per_s": tokens_per_s / 18,
        HOST_PEAK: peak_bytes,
        "ppo/gold_gain": 0.3 + 0.01 * number,
        "ppo/score_gain": 4.1,
        "ppo/kl_final": 3.1,
        "rm/eval_accuracy": 0.921875,
        "sft/loss_final": 3.084,
        "time/trial_s": 8.9 + number,
        "mem/predicted_device_peak_bytes": (9 + number) * MIB,
    }
    for i, stage in enumerate(TIMED_PHASES):
        result[f"time/{stage}_s"] = 0.5 + 0.1 * i + 0.01 * number
        result[f"mem/{stage}/predicted_device_peak_bytes"] = (5 + i) * MIB + number * MIB
        result[f"mem/{stage}/peak_host_rss_bytes"] = peak_bytes - (4 - i) * MIB
        if gpu:
            result[f"mem/{stage}/peak_device_allocated_bytes"] = (5.5 + i) * MIB + number * MIB
    if gpu:
        result[DEVICE_PEAK] = (10 + number) * MIB
    for engine in ENGINES:
        states = 2_390_016 if engine in ("sft", "rm", "actor", "critic") else 298_752
        result[f"mem/{engine}/predicted_model_states_bytes"] = states
        result[f"mem/{engine}/measured_model_states_bytes"] = states + 8 * (number % 3)
    return result


def series(number: int) -> dict:
    steps = range(20)
    return {
        "ppo/score": [0.7 + 0.2 * s + 0.01 * number for s in steps],
        "ppo/gold": [0.26 + (0.01 + 0.001 * number) * s for s in steps],
        "ppo/kl": [0.1 * s for s in steps],
    }


def completed(
    number: int, params: dict, tokens_per_s: float, peak_bytes: float, objectives: list,
    *, gpu: bool = False, baseline: str | None = None, constraints: dict | None = None,
):  # fmt: skip
    """A COMPLETE trial; its values are its metrics named by `objectives`."""
    trial_metrics = metrics(number, tokens_per_s, peak_bytes, gpu)
    attrs = {
        **metric_attrs(trial_metrics), TrialAttr.STATUS: "ok", TrialAttr.REASON: "",
        TrialAttr.SERIES: series(number), TrialAttr.CONFIG: config_with(params),
        TrialAttr.PREDICTED: predicted(number), TrialAttr.WALL_S: 13.4 + number,
        TrialAttr.OUT_DIR: f"runs/study/trial-{number:04d}", TrialAttr.WORKER: "w0",
    }  # fmt: skip
    if baseline:
        attrs[TrialAttr.BASELINE] = baseline
    return create_trial(
        state=TrialState.COMPLETE,
        values=[trial_metrics[o["metric"]] for o in objectives],
        params=params, distributions={k: DISTRIBUTIONS[k] for k in params},
        user_attrs=attrs, constraints=constraints,
    )  # fmt: skip


def unfinished(number: int, state: TrialState, status: str, reason: str, params: dict):
    """A FAIL or PRUNED trial: no values, the prediction, partial metrics for a failure."""
    attrs = {
        TrialAttr.STATUS: status, TrialAttr.REASON: reason,
        **metric_attrs({"sft/loss_final": 3.2} if state == TrialState.FAIL else {}),
        TrialAttr.SERIES: {}, TrialAttr.CONFIG: config_with(params),
        TrialAttr.PREDICTED: predicted(number), TrialAttr.WALL_S: 2.0,
    }  # fmt: skip
    return create_trial(
        state=state, params=params, distributions={k: DISTRIBUTIONS[k] for k in params},
        user_attrs=attrs,
    )  # fmt: skip


CPU_OBJECTIVES = [
    {"metric": THROUGHPUT, "direction": "maximize"},
    {"metric": HOST_PEAK, "direction": "minimize"},
]
OOM = "out of memory in ppo_train (host RSS 2.1 GiB)"
UNSUPPORTED = "the hybrid engine needs CUDA"
PRUNED_MEMORY = "predicted device peak 90.0 GiB > budget 80 GiB"


def cpu_study(name: str = "smoke", storage: str | None = None) -> optuna.Study:
    """Two objectives (throughput up, host RSS down), a baseline, failures, a pruned trial and
    an infeasible one. Pareto front (feasible, complete): trials 1, 2, 4, 5, 10."""
    study = optuna.create_study(
        study_name=name, storage=storage, directions=["maximize", "minimize"]
    )
    study.set_user_attr(OBJECTIVES_ATTR, CPU_OBJECTIVES)
    objectives = CPU_OBJECTIVES
    trials = [
        completed(0, knobs(2, "none", 0, 16), 2831, 600 * MIB, objectives, baseline=BASELINE),
        completed(1, knobs(3, "cpu", 0, 16), 1500, 520 * MIB, objectives),
        completed(2, knobs(1, "none", 8, 16), 4000, 640 * MIB, objectives),
        unfinished(3, TrialState.FAIL, "oom", OOM, knobs(0, "none", 0, 16)),
        completed(4, knobs(2, "none", 8, 8), 5213, 700 * MIB, objectives),
        completed(5, knobs(3, "cpu", 8, 8), 1200, 480 * MIB, objectives),
        unfinished(6, TrialState.FAIL, "unsupported", UNSUPPORTED, knobs(1, "cpu", 0, 8)),
        unfinished(7, TrialState.PRUNED, "pruned_memory", PRUNED_MEMORY, knobs(0, "none", 0, 8)),
        unfinished(8, TrialState.FAIL, "oom", OOM, knobs(0, "none", 8, 16)),
        completed(
            9,
            knobs(0, "none", 8, 8),
            6000,
            900 * MIB,
            objectives,
            constraints={"mem/peak_host_rss_bytes:le_800": 100 * MIB},
        ),
        completed(10, knobs(1, "cpu", 0, 8), 3000, 560 * MIB, objectives),
    ]
    for trial in trials:
        study.add_trial(trial)
    return study


GPU_OBJECTIVES = [
    {"metric": THROUGHPUT, "direction": "maximize"},
    {"metric": "ppo/gold_gain", "direction": "maximize"},
]


def gpu_study(name: str = "h200") -> optuna.Study:
    """Throughput and gold gain on a GPU (device-allocated memory), no baseline, one OOM."""
    study = optuna.create_study(study_name=name, directions=["maximize", "maximize"])
    study.set_user_attr(OBJECTIVES_ATTR, GPU_OBJECTIVES)
    objectives = GPU_OBJECTIVES
    trials = [
        completed(0, knobs(2, "none", 0, 16), 41000, 3 * GIB, objectives, gpu=True),
        completed(1, knobs(3, "none", 0, 16), 35000, 2 * GIB, objectives, gpu=True),
        unfinished(2, TrialState.FAIL, "oom", "CUDA out of memory", knobs(0, "none", 0, 16)),
        completed(3, knobs(3, "cpu", 8, 8), 12000, 2 * GIB, objectives, gpu=True),
    ]
    for trial in trials:
        study.add_trial(trial)
    return study
