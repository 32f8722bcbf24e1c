"""Pure builders: TrialConfig -> DeepSpeed config dicts, one per engine.

The same dicts configure the trial's engines and are what `tunelab export` writes as JSON.
Modelled on DeepSpeed-Chat's dschat/utils/ds_utils.py (get_train_ds_config/get_eval_ds_config).
"""

from __future__ import annotations

from typing import Any

from tunelab.config import EngineConfig, TrialConfig
from tunelab.records import TRAINED_ENGINES

_ADAM_BETAS = [0.9, 0.95]  # DeepSpeed-Chat's AdamW betas


def _precision_section(precision: str) -> dict[str, Any]:
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    if precision == "fp16":
        return {"fp16": {"enabled": True, "loss_scale_window": 100}}
    return {}


def _zero_section(stage: int, offload_optimizer: str, offload_params: str) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1 or offload_optimizer != "none":  # DeepSpeed-Chat sets it at stage 0 too
        zero["offload_optimizer"] = {
            "device": offload_optimizer,
            "pin_memory": offload_optimizer != "none",
        }
    if stage >= 2:
        zero["overlap_comm"] = True
        zero["contiguous_gradients"] = True
    if stage == 3:
        zero["offload_param"] = {"device": offload_params, "pin_memory": offload_params != "none"}
        zero["stage3_param_persistence_threshold"] = 10_000
        zero["stage3_max_live_parameters"] = 30_000_000
        zero["stage3_prefetch_bucket_size"] = 30_000_000
    return zero


def batch_section(config: TrialConfig) -> dict[str, int]:
    """DeepSpeed's three batch keys; train_batch_size = micro x accumulation x ranks."""
    batch = config.batch
    return {
        "train_batch_size": batch.train_micro * batch.grad_accum * config.ranks,
        "train_micro_batch_size_per_gpu": batch.train_micro,
        "gradient_accumulation_steps": batch.grad_accum,
    }


def train_ds_config(config: TrialConfig, engine: EngineConfig, learning_rate: float) -> dict:
    """A trained engine (SFT, reward model, PPO actor or critic)."""
    return {
        **batch_section(config),
        "steps_per_print": 10**9,
        "zero_optimization": _zero_section(
            engine.zero_stage, engine.offload_optimizer, engine.offload_params
        ),
        **_precision_section(config.precision),
        "gradient_clipping": 1.0,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": learning_rate,
                "betas": _ADAM_BETAS,
                "eps": 1e-8,
                "weight_decay": 0.0,
            },
        },
        "wall_clock_breakdown": False,
    }


def eval_ds_config(config: TrialConfig, zero_stage: int, offload: bool) -> dict:
    """A frozen engine (reference or reward model): no optimizer, params offloaded under ZeRO-3."""
    return {
        **batch_section(config),
        "steps_per_print": 10**9,
        "zero_optimization": _zero_section(zero_stage, "none", "cpu" if offload else "none"),
        **_precision_section(config.precision),
        "wall_clock_breakdown": False,
    }


def hybrid_engine_section(config: TrialConfig) -> dict[str, Any]:
    """DeepSpeed's hybrid engine for actor generation (DeepSpeed-Chat's settings)."""
    return {
        "enabled": config.hybrid_engine,
        "max_out_tokens": config.ppo.max_prompt_len + config.ppo.max_answer_len,
        "inference_tp_size": 1,
        "release_inference_cache": False,
        "pin_parameters": True,
        "tp_gather_partition_size": 8,
    }


def engine_ds_configs(config: TrialConfig) -> dict[str, dict]:
    """Every engine's DeepSpeed config, keyed by tunelab.records.ENGINES.

    The reference follows the actor's ZeRO stage only when it is 3 (else stage 0), the reward
    model the critic's, as in DeepSpeed-Chat's rlhf_engine.py.
    """
    actor = train_ds_config(config, config.actor, config.actor.learning_rate)
    if config.hybrid_engine:
        actor["hybrid_engine"] = hybrid_engine_section(config)
    return {
        "sft": train_ds_config(config, config.actor, config.sft.learning_rate),
        "rm": train_ds_config(config, config.critic, config.rm.learning_rate),
        "actor": actor,
        "critic": train_ds_config(config, config.critic, config.critic.learning_rate),
        "reference": eval_ds_config(
            config, 3 if config.actor.zero_stage == 3 else 0, config.offload_reference
        ),
        "reward": eval_ds_config(
            config, 3 if config.critic.zero_stage == 3 else 0, config.offload_reward
        ),
    }


def with_tracker(ds_configs: dict[str, dict], tracker: str, output_path: str) -> dict[str, dict]:
    """`ds_configs` with DeepSpeed's monitor section for `tracker` in each trained engine
    (csv and tensorboard write under `output_path`/<engine>; wandb logs to project tunelab,
    one group per engine); as given for `none`. Apart from engine_ds_configs, so an export
    never carries a trial folder's path."""
    if tracker == "none":
        return ds_configs
    section = {"csv": "csv_monitor", "tensorboard": "tensorboard", "wandb": "wandb"}[tracker]
    tracked = dict(ds_configs)
    for engine in TRAINED_ENGINES:
        monitor = {"enabled": True, "output_path": output_path, "job_name": engine}
        if tracker == "wandb":
            monitor = {"enabled": True, "project": "tunelab", "group": engine}
        tracked[engine] = {**ds_configs[engine], section: monitor}
    return tracked
