"""DeepSpeed-Chat's step-3 command line (pure, no torch): its flags as data, a parser built from
them, and the command that runs a tunelab trial's settings there.

STEP3_FLAGS transcribes `parse_args()` of DeepSpeedExamples
applications/DeepSpeed-Chat/training/step3_rlhf_finetuning/main.py at commit 45b4b715, plus the
four flags `deepspeed.add_config_arguments` adds (DeepSpeed 0.19). main.py calls the strict
`parse_args()`, so a flag it does not define ends the run: every command tunelab writes is
parsed with `step3_parser()` in the tests. `benchmarks/check_dschat_flags.py` compares this
table with a DeepSpeedExamples checkout.
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

from tunelab.config import TrialConfig
from tunelab.errors import InputError
from tunelab.presets import PRESETS


class Flag(NamedTuple):
    name: str
    type: str | None = None  # "str", "int", "float"; None for store_true flags
    default: Any = None
    choices: tuple[str, ...] | None = None
    nargs: str | None = None
    required: bool = False

    @property
    def is_switch(self) -> bool:
        return self.type is None and self.nargs is None


_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
               "constant_with_warmup")  # fmt: skip

STEP3_FLAGS: tuple[Flag, ...] = (
    Flag("--data_path", "str", ("Dahoas/rm-static",), nargs="*"),
    Flag("--data_split", "str", "2,4,4"),
    Flag("--data_output_path", "str", "/tmp/data_files"),
    Flag("--unsupervised_dataset_name", "str"),
    Flag("--unsupervised_dataset_config_name", "str"),
    Flag("--unsup_coef", "float", 27.8),
    Flag("--actor_model_name_or_path", "str", required=True),
    Flag("--critic_model_name_or_path", "str", required=True),
    Flag("--num_padding_at_beginning", "int", 1),
    Flag("--per_device_generation_batch_size", "int", 16),
    Flag("--per_device_training_batch_size", "int", 16),
    Flag("--generation_batches", "int", 1),
    Flag("--ppo_epochs", "int", 1),
    Flag("--max_prompt_seq_len", "int", 256),
    Flag("--max_answer_seq_len", "int", 256),
    Flag("--actor_learning_rate", "float", 9.65e-6),
    Flag("--critic_learning_rate", "float", 5e-6),
    Flag("--actor_weight_decay", "float", 0.0),
    Flag("--critic_weight_decay", "float", 0.0),
    Flag("--num_train_epochs", "int", 1),
    Flag("--lr_scheduler_type", "str", "cosine", _SCHEDULERS),
    Flag("--gradient_accumulation_steps", "int", 1),
    Flag("--num_warmup_steps", "int", 100),
    Flag("--output_dir", "str"),
    Flag("--seed", "int"),
    Flag("--preprocessing_num_workers", "int"),
    Flag("--local_rank", "int", -1),
    Flag("--enable_hybrid_engine"),
    Flag("--unpin_actor_parameters"),
    Flag("--release_inference_cache"),
    Flag("--inference_tp_size", "int", 1),
    Flag("--tp_gather_partition_size", "int", 8),
    Flag("--offload"),
    Flag("--dtype", "str", "fp16", ("fp16", "bf16")),
    Flag("--offload_reference_model"),
    Flag("--offload_reward_model"),
    Flag("--actor_zero_stage", "int", 0),
    Flag("--critic_zero_stage", "int", 0),
    Flag("--actor_gradient_checkpointing"),
    Flag("--critic_gradient_checkpointing"),
    Flag("--actor_dropout", "float"),
    Flag("--critic_dropout", "float"),
    Flag("--actor_lora_dim", "int", 0),
    Flag("--actor_lora_module_name", "str", "decoder.layers."),
    Flag("--critic_lora_dim", "int", 0),
    Flag("--critic_lora_module_name", "str", "decoder.layers."),
    Flag("--only_optimize_lora"),
    Flag("--actor_lora_learning_rate", "float", 5e-4),
    Flag("--critic_lora_learning_rate", "float", 5e-4),
    Flag("--enable_ema"),
    Flag("--enable_mixed_precision_lora"),
    Flag("--compute_fp32_loss"),
    Flag("--enable_tensorboard"),
    Flag("--tensorboard_path", "str", "step3_tensorboard"),
    Flag("--add_eot_token"),
    Flag("--align_overflow"),
    Flag("--print_answers"),
    Flag("--print_answers_interval", "int", 1),
    Flag("--enable_test_mode"),
    Flag("--test_stop_step", "int", 0),
    # deepspeed.add_config_arguments
    Flag("--deepspeed"),
    Flag("--deepspeed_config", "str"),
    Flag("--deepscale"),
    Flag("--deepscale_config", "str"),
)

_TYPES = {"str": str, "int": int, "float": float}


class _Step3Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as tunelab reports every bad input
        raise InputError(f"DeepSpeed-Chat step-3 flags: {message}")


def step3_parser() -> argparse.ArgumentParser:
    """A parser with exactly DeepSpeed-Chat step 3's flags, types, choices and defaults; bad
    flags raise InputError."""
    parser = _Step3Parser(prog="main.py", add_help=False)
    for flag in STEP3_FLAGS:
        if flag.is_switch:
            parser.add_argument(flag.name, action="store_true")
            continue
        kwargs: dict[str, Any] = {"type": _TYPES[flag.type], "default": flag.default}
        if flag.choices:
            kwargs["choices"] = flag.choices
        if flag.nargs:
            kwargs["nargs"] = flag.nargs
        parser.add_argument(flag.name, required=flag.required, **kwargs)
    return parser


# Hub names of the presets' real models, for DeepSpeed-Chat's --*_model_name_or_path.
HUB_NAMES = {
    "opt-125m": "facebook/opt-125m",
    "opt-350m": "facebook/opt-350m",
    "opt-1.3b": "facebook/opt-1.3b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
}


def _lora_scope(model: str) -> str | None:
    """--*_lora_module_name for a Llama preset ("layers.", as DeepSpeed-Chat's Llama scripts
    pass); None keeps its default "decoder.layers." (OPT)."""
    shape = PRESETS.get(model)
    return "layers." if shape is not None and shape.family == "llama" else None


def step3_command(config: TrialConfig) -> tuple[list[str], list[str]]:
    """DeepSpeed-Chat step-3 argv for a trial's settings, and notes on what its flags cannot
    say (PPO coefficients are hard-coded there; one --offload covers actor and critic)."""
    actor, critic, batch, ppo = config.actor, config.critic, config.batch, config.ppo

    def model(name: str, role: str, given: bool) -> str:
        if given:  # the trial started from this checkpoint, as step 3 does
            return name
        return f"<{role} checkpoint trained from {HUB_NAMES.get(name, name)}>"

    argv = [
        "deepspeed", "--num_gpus", str(config.ranks), "main.py",
        "--actor_model_name_or_path", model(config.models.actor, "step-1 SFT",
                                            config.sft.steps == 0),
        "--critic_model_name_or_path", model(config.models.critic, "step-2 reward",
                                             config.rm.steps == 0),
        "--actor_zero_stage", str(actor.zero_stage), "--critic_zero_stage", str(critic.zero_stage),
        "--per_device_generation_batch_size", str(batch.generation_micro),
        "--per_device_training_batch_size", str(batch.train_micro),
        "--gradient_accumulation_steps", str(batch.grad_accum),
        "--generation_batches", str(ppo.generation_batches), "--ppo_epochs", str(ppo.epochs),
        "--max_prompt_seq_len", str(ppo.max_prompt_len),
        "--max_answer_seq_len", str(ppo.max_answer_len),
        "--actor_learning_rate", f"{actor.learning_rate:g}",
        "--critic_learning_rate", f"{critic.learning_rate:g}",
        "--seed", str(config.seed), "--deepspeed",
    ]  # fmt: skip
    notes = [
        "DeepSpeed-Chat hard-codes the PPO coefficients in dschat/rlhf/ppo_trainer.py "
        f"(DeepSpeedPPOTrainer.__init__); set kl_ctl={ppo.kl_coef:g}, "
        f"clip_reward_value={ppo.reward_clip:g}, cliprange={ppo.clip_range:g}, "
        f"cliprange_value={ppo.value_clip_range:g}, gamma={ppo.gamma:g}, lam={ppo.lam:g} there.",
        "DeepSpeed-Chat schedules learning rates (cosine, --num_warmup_steps 100); tunelab's "
        "trials keep them constant.",
    ]
    if config.precision == "fp32":
        notes.append("DeepSpeed-Chat's --dtype takes fp16 or bf16 only; this trial ran in fp32.")
    else:
        argv += ["--dtype", config.precision]
    offloaded = {actor.offload_optimizer, critic.offload_optimizer, actor.offload_params,
                 critic.offload_params} - {"none"}  # fmt: skip
    if offloaded:
        argv.append("--offload")
        notes.append(
            "DeepSpeed-Chat's --offload moves optimizer (and under ZeRO-3 parameter) state of "
            "both actor and critic to the CPU; the JSON files here set each engine separately."
        )
    switches = {
        "--offload_reference_model": config.offload_reference,
        "--offload_reward_model": config.offload_reward,
        "--enable_hybrid_engine": config.hybrid_engine,
        "--actor_gradient_checkpointing": actor.gradient_checkpointing,
        "--critic_gradient_checkpointing": critic.gradient_checkpointing,
    }
    argv += [flag for flag, on in switches.items() if on]
    for role, engine in (("actor", actor), ("critic", critic)):
        if engine.dropout is not None:
            argv += [f"--{role}_dropout", f"{engine.dropout:g}"]
        if not engine.lora_rank:
            continue
        argv += [f"--{role}_lora_dim", str(engine.lora_rank),
                 f"--{role}_lora_learning_rate", f"{engine.lora_learning_rate:g}"]  # fmt: skip
        scope = _lora_scope(getattr(config.models, role))
        if scope:
            argv += [f"--{role}_lora_module_name", scope]
        if engine.lora_modules != ("all-linear",):
            notes.append(
                f"DeepSpeed-Chat puts LoRA on every linear layer under --{role}_lora_module_name;"
                f" this trial's {role} adapted only {', '.join(engine.lora_modules)}."
            )
        if engine.lora_scaling != 1.0:
            notes.append(f"DeepSpeed-Chat's step 3 scales LoRA by 1/rank (no --lora_scaling); "
                         f"this trial's {role} used {engine.lora_scaling:g}/rank.")  # fmt: skip
    if actor.lora_rank or critic.lora_rank:
        argv.append("--only_optimize_lora")  # tunelab's LoRA (peft) freezes the base
    if actor.zero_stage == 3 and ppo.zero3_generation == "gather_once":
        notes.append(
            "DeepSpeed-Chat gathers a ZeRO-3 actor layer by layer for every generated token "
            "(ppo.zero3_generation: per_layer); this trial gathered it once per generate call."
        )
    if ppo.decoding == "sample":
        notes.append(
            f"DeepSpeed-Chat decodes with the actor's generation config (greedy for OPT); this "
            f"trial sampled at temperature {ppo.temperature:g} (ppo.decoding: greedy matches)."
        )
    return argv, notes


def import_step3(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """A DeepSpeed-Chat step-3 command line (the flags after main.py, or the whole `deepspeed
    ... main.py ...` command) as dotted trial-config overrides, and notes on what tunelab runs
    differently or cannot express. Flags left out take DeepSpeed-Chat's defaults, as there.

    Step 3 starts from trained step-1 and step-2 models, so the trial's SFT and RM stages are
    given (steps 0) and its actor and critic are those checkpoints.
    """
    if "main.py" in argv:
        argv = argv[argv.index("main.py") + 1 :]
    args = step3_parser().parse_args(argv)
    values: dict[str, Any] = {
        "models.actor": args.actor_model_name_or_path,
        "models.critic": args.critic_model_name_or_path,
        "sft.steps": 0, "rm.steps": 0,
        "precision": args.dtype,
        "batch.generation_micro": args.per_device_generation_batch_size,
        "batch.train_micro": args.per_device_training_batch_size,
        "batch.grad_accum": args.gradient_accumulation_steps,
        "ppo.generation_batches": args.generation_batches, "ppo.epochs": args.ppo_epochs,
        "ppo.max_prompt_len": args.max_prompt_seq_len,
        "ppo.max_answer_len": args.max_answer_seq_len,
        # Its generate call: max_length = min_length = prompt + answer, no sampling arguments.
        "ppo.min_answer_len": args.max_answer_seq_len, "ppo.decoding": "greedy",
        "actor.learning_rate": args.actor_learning_rate,
        "critic.learning_rate": args.critic_learning_rate,
        "hybrid_engine": False,
    }  # fmt: skip
    if args.seed is not None:
        values["seed"] = args.seed
    notes = []
    offload = "cpu" if args.offload else "none"
    for role in ("actor", "critic"):
        stage = getattr(args, f"{role}_zero_stage")
        values[f"{role}.zero_stage"] = stage
        values[f"{role}.offload_optimizer"] = offload
        # Its ds_utils offloads parameters too; DeepSpeed does that only under ZeRO-3.
        values[f"{role}.offload_params"] = offload if stage == 3 else "none"
        values[f"{role}.gradient_checkpointing"] = getattr(args, f"{role}_gradient_checkpointing")
        values[f"{role}.dropout"] = getattr(args, f"{role}_dropout")
        rank = getattr(args, f"{role}_lora_dim")
        values[f"{role}.lora_rank"] = rank
        if rank:
            values[f"{role}.lora_learning_rate"] = getattr(args, f"{role}_lora_learning_rate")
            if not args.only_optimize_lora:
                notes.append(f"--{role}_lora_dim without --only_optimize_lora trains the base "
                             "weights too; tunelab's LoRA freezes them.")  # fmt: skip
        if getattr(args, f"{role}_weight_decay"):
            notes.append(f"--{role}_weight_decay: tunelab's trials use none.")
    for flag, key, follows in (("offload_reference_model", "offload_reference", "actor"),
                               ("offload_reward_model", "offload_reward", "critic")):  # fmt: skip
        wanted = getattr(args, flag)
        values[key] = wanted and values[f"{follows}.zero_stage"] == 3
        if wanted and not values[key]:
            notes.append(f"--{flag}: DeepSpeed offloads parameters only under ZeRO-3, which "
                         f"the {follows} does not use here; it had no effect.")  # fmt: skip
    if args.enable_hybrid_engine:
        notes.append("--enable_hybrid_engine: DeepSpeed 0.19's hybrid engine runs neither "
                     "transformers 5 models nor peft adapters; the trial runs without it.")
    if args.enable_test_mode:
        values["ppo.steps"] = max(args.test_stop_step, 1)
    else:
        notes.append("DeepSpeed-Chat trains for whole epochs over its data; the trial runs "
                     "ppo.steps PPO steps.")  # fmt: skip
    if len(args.data_path) == 1 and not args.data_path[0].startswith("Dahoas/"):
        values["data.source"] = args.data_path[0]
    else:
        notes.append(f"--data_path {' '.join(args.data_path)}: the trial keeps its data.source "
                     "(set it to your local copy)")  # fmt: skip
    unmodelled = {
        "enable_ema": "an EMA copy of the actor", "unsupervised_dataset_name":
        "the unsupervised (PTX) loss", "enable_mixed_precision_lora": "ZeRO++ mixed-precision "
        "LoRA", "compute_fp32_loss": "fp32 losses (tunelab computes log-probabilities in fp32)",
        "align_overflow": "aligned overflow skipping",
    }  # fmt: skip
    notes += [f"--{flag}: {what} is not modelled." for flag, what in unmodelled.items()
              if getattr(args, flag)]  # fmt: skip
    if args.inference_tp_size > 1:
        notes.append("--inference_tp_size: tensor-parallel generation is not modelled.")
    notes.append(f"Learning rates stay constant (DeepSpeed-Chat: {args.lr_scheduler_type}, "
                 f"{args.num_warmup_steps} warm-up steps).")  # fmt: skip
    return values, notes
