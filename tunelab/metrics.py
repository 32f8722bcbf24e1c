"""The names of trial metrics (flat, namespaced), so specs can be checked before a study runs.

A test checks that every metric a trial writes matches one of these patterns.
"""

from __future__ import annotations

import difflib
import re
import statistics
from collections.abc import Sequence

from tunelab.errors import InputError
from tunelab.records import ENGINES

_PHASES = "sft|rm|ppo_generate|ppo_experience|ppo_train|ppo_e2e"
_MEMORY_STAGES = "setup|sft|rm|ppo_generate|ppo_experience|ppo_train|ppo_eval"
_ENGINES = "|".join(ENGINES)

PATTERNS = tuple(
    re.compile(pattern)
    for pattern in (
        r"sft/(steps|skipped_steps|loss_first|loss_final|reused)",
        r"rm/(steps|skipped_steps|reused|loss_first|loss_final|eval_accuracy|eval_accuracy_start"
        r"|eval_pairs)",
        r"ppo/(steps|timed_steps|actor_skipped_steps|critic_skipped_steps|score_start|score_end"
        r"|score_gain|gold_start|gold_end|gold_gain|kl_final|clip_fraction|value_loss_final"
        r"|policy_loss_final|answer_tokens_mean|start_reused)",
        rf"time/({_PHASES}|ppo_step|ppo_dschat_e2e|trial|process|data|setup|eval|handoff)_s",
        rf"perf/({_PHASES})_(samples_per_s|tokens_per_s|tflops_per_rank|mfu)",
        # Tokens that are not padding (answers up to eos for generation; prompt + answer for the
        # rest), next to tokens_per_s, which counts every padded position the hardware computes
        r"perf/(ppo_generate|ppo_experience|ppo_train|ppo_e2e)_nonpad_tokens_per_s",
        r"perf/(ppo_generate_latency_s|ppo_generate_per_token_latency_s|peak_tflops)",
        r"mem/(peak_host_rss|peak_device_allocated|peak_device_reserved)_bytes",
        # NVML's device memory used minus torch's reserved: CUDA context, NCCL, other libraries
        r"mem/peak_device_non_torch_bytes",
        r"mem/predicted_(device|host)_peak_bytes",
        r"mem/predicted_device_headroom_bytes",
        rf"mem/({_MEMORY_STAGES})/(peak_host_rss|peak_device_allocated|peak_device_reserved)_bytes",
        rf"mem/({_MEMORY_STAGES})/predicted_(device|host)_peak_bytes",
        rf"mem/({_ENGINES})/(predicted_model_states|measured_model_states|measured_buffers)_bytes",
        r"gpu/(name|memory_total_bytes|nvml_used_peak_bytes|util_mean_pct|power_mean_w)",
        rf"model/({_ENGINES})/(parameters|trainable_parameters)",
        r"gpu/nvml_status",  # "on (<uuid>)" or "off: <why>" on a GPU
        r"trial/(ranks|cpu_threads|forked)",  # forked: 1 when from a zygote (tunelab.zygote)
    )
)

# Measured on a GPU only: device memory (torch.cuda's counters) and NVML's figures. MFU needs a
# device peak, which a CPU has only when the trial config gives one (peak_tflops).
GPU_ONLY = re.compile(r"mem/(\w+/)?peak_device_\w+|gpu/\w+")
NEEDS_PEAK = re.compile(r"perf/\w+_mfu")

# Examples for "did you mean" hints.
COMMON = (
    "perf/ppo_e2e_tokens_per_s", "perf/ppo_e2e_nonpad_tokens_per_s", "perf/ppo_e2e_samples_per_s",
    "perf/ppo_generate_tokens_per_s", "perf/ppo_generate_nonpad_tokens_per_s",
    "perf/ppo_train_tflops_per_rank", "time/ppo_step_s", "mem/peak_host_rss_bytes",
    "mem/peak_device_allocated_bytes", "mem/predicted_device_peak_bytes", "ppo/gold_gain",
    "ppo/score_gain", "ppo/kl_final", "rm/eval_accuracy", "sft/loss_final",
)  # fmt: skip


# What a trial reports after each PPO step while it runs (progress.jsonl: its intermediate
# values, which a pruner reads; not in metrics.json), and which way is better. The `_recent`
# ones are recent_mean of the per-step series (one step's batch is too few answers to rank
# trials by). Trials with the same seed, ranks, generation micro-batch and generation batches
# draw the same prompts at a step; `ppo.epochs` and `ppo.generation_batches` change how much
# a step learns.
PROGRESS_METRICS = {
    "perf/ppo_e2e_tokens_per_s": "maximize",  # from the first step after warm-up
    "ppo/score_recent": "maximize",  # reward-model score
    "ppo/gold_recent": "maximize",  # gold reward (synthetic data only)
    "ppo/kl_recent": "minimize",  # KL to the reference
}
RECENT_STEPS = 5
# Final metrics a running trial already approaches, and the progress value that does
# (spec Constraint.stop_margin). ppo/kl_final is the mean KL over the last quarter of the steps,
# and KL to the reference grows with training (in expectation), so a trial far past a KL bound
# midway is very unlikely to end within it. Memory peaks only grow, and the peaks so far are
# taken as the final ones are (max over ranks): one past a bound is a final peak past it, so a
# stop margin of 0 stops no trial that would have ended within the bound.
RUNNING = {
    "ppo/kl_final": "ppo/kl_recent",
    "mem/peak_host_rss_bytes": "mem/peak_host_rss_so_far_bytes",
    "mem/peak_device_allocated_bytes": "mem/peak_device_allocated_so_far_bytes",
    "mem/peak_device_reserved_bytes": "mem/peak_device_reserved_so_far_bytes",
}


def recent_mean(values: Sequence[float]) -> float:
    """Mean of the last RECENT_STEPS values of a per-step series."""
    return statistics.fmean(values[-RECENT_STEPS:])


def is_metric_name(name: str) -> bool:
    return any(pattern.fullmatch(name) for pattern in PATTERNS)


def check_metric_name(name: str) -> None:
    if not is_metric_name(name):
        close = difflib.get_close_matches(name, COMMON, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InputError(f"unknown metric {name!r}{hint}")


_STAGE_OF = re.compile(r"(?:perf/|time/|mem/|model/)?(sft|rm)[/_]")


def metric_stage(name: str) -> str | None:
    """The stage (`sft` or `rm`) whose run a metric measures, None for PPO's and the whole
    trial's: a study that reuses a stage (spec `measure`) cannot compare its figures."""
    match = _STAGE_OF.match(name)
    return match.group(1) if match else None
