"""Trial process entry point: read trial.json, run SFT -> RM -> PPO, write metrics.json.

    python -m tunelab.pipeline --config DIR/trial.json --out DIR        (one rank)
    torchrun --nproc_per_node 2 -m tunelab.pipeline --config ... --out DIR

Every rank writes rank<N>.json (its status and memory); rank 0 also writes metrics.json with
the status, the flat namespaced metrics, per-step series and per-rank memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import transformers
from transformers import AutoConfig

from tunelab import dsconfig
from tunelab.config import TrialConfig, config_from_dict
from tunelab.data import load_preferences
from tunelab.errors import TrialFailure
from tunelab.gpus import mfu_metrics, peak_tflops
from tunelab.launcher import STAGE_PLAN, WATCH_ENV
from tunelab.memory import trial_prediction
from tunelab.pipeline.batching import encode
from tunelab.pipeline.checkpoints import load_stage_entry, save_stage_entry
from tunelab.pipeline.context import TrialContext
from tunelab.pipeline.models import build_tokenizer
from tunelab.pipeline.ppo import run_ppo
from tunelab.pipeline.rm import run_rm
from tunelab.pipeline.runtime import start_runtime
from tunelab.pipeline.sft import run_sft
from tunelab.pipeline.startup import freeze_imported_objects, remember_cpu_info
from tunelab.pipeline.telemetry import MemoryTracker, PhaseTimer, ProgressLog
from tunelab.presets import ModelSource, resolve_model, shape_from_hf_config
from tunelab.records import Status
from tunelab.stagecache import START, reused_stages

log = logging.getLogger("tunelab")


def classify(exc: BaseException) -> tuple[Status, str]:
    """(status, one-line reason) of an exception that ended a trial."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, TrialFailure):
        return exc.status, text
    lowered = text.lower()
    if isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in lowered:
        return Status.OOM, f"{type(exc).__name__}: {text}"
    if "can't allocate memory" in lowered:
        return Status.OOM, f"{type(exc).__name__}: {text}"
    if "not supported on your device" in lowered:
        return Status.UNSUPPORTED, text
    return Status.ERROR, f"{type(exc).__name__}: {text}"


def _shape(source: ModelSource):
    if source.shape is not None:
        return source.shape
    return shape_from_hf_config(AutoConfig.from_pretrained(source.hf_path).to_dict(), source.name)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _engine_configs(config: TrialConfig, out_dir) -> dict[str, dict]:
    """tunelab.dsconfig's engine configs, with the tracker writing into the trial's folder."""
    configs = dsconfig.engine_ds_configs(config)
    if out_dir is None:  # nowhere to write to
        return configs
    return dsconfig.with_tracker(configs, config.tracker, str(Path(out_dir) / "tracker"))


def build_context(config: TrialConfig, runtime, memory, out_dir=None, ds_configs=None):
    """Data, tokenizer, model sources and meters of a trial. `ds_configs` defaults to the ones
    tunelab.dsconfig derives (an export's JSON files can stand in for them)."""
    torch.manual_seed(config.seed)  # same initial weights on every rank
    actor_source = resolve_model(config.models.actor)
    critic_source = resolve_model(config.models.critic)
    data = config.data
    train, held_out = load_preferences(
        data.source, data.train_size, data.eval_size, config.seed, data.eval_source,
        config.eval_seed,
    )
    texts = [text for e in train + held_out for text in (e.prompt, e.chosen, e.rejected)]
    tokenizer = build_tokenizer(actor_source, texts)
    ppo = config.ppo
    ctx = TrialContext(
        config=config,
        runtime=runtime,
        tokenizer=tokenizer,
        data=encode(tokenizer, train, held_out, ppo.max_prompt_len, ppo.max_answer_len),
        actor_source=actor_source,
        critic_source=critic_source,
        actor_shape=_shape(actor_source),
        critic_shape=_shape(critic_source),
        ds_configs=ds_configs or _engine_configs(config, out_dir),
        timer=PhaseTimer(runtime.synchronize),
        memory=memory,
        progress=ProgressLog(out_dir / "progress.jsonl" if out_dir and runtime.is_main else None),
    )
    for name, shape in (("actor", ctx.actor_shape), ("critic", ctx.critic_shape)):
        if ctx.sequence_len > shape.max_positions:
            raise TrialFailure(
                f"ppo.max_prompt_len + max_answer_len = {ctx.sequence_len} exceeds the {name}'s "
                f"{shape.max_positions} positions"
            )
    return ctx


def _run_stages(config: TrialConfig, runtime, memory, out_dir: Path | None, result: dict,
                plan: dict) -> None:  # fmt: skip
    """SFT -> RM -> PPO, filling `result` as it goes (so a failure keeps what was measured).
    `plan` (tunelab.stagecache.stage_plan) says which stages load from or save to the cache."""
    started = time.perf_counter()
    ctx = build_context(config, runtime, memory, out_dir)
    data_s = time.perf_counter() - started  # data, tokenizer, encoding
    prediction = trial_prediction(config, ctx.actor_shape, ctx.critic_shape,
                                  runtime.device.type == "cuda", reused_stages(plan))  # fmt: skip
    result["memory"] = {"predicted": prediction.to_dict(), "measured": ctx.engine_states}
    result["metrics"].update(prediction.flat_metrics())
    series: dict[str, list[float]] = {}
    result["stages"] = {}
    handoff = {}  # trained weights for PPO (rank 0's; the others hold None)
    for stage, run, source in (("sft", run_sft, config.models.actor),
                               ("rm", run_rm, config.models.critic)):  # fmt: skip
        steps, cached = getattr(config, stage).steps, plan.get(stage, {})
        if steps == 0:
            result["stages"][stage] = {"source": "given", "model": source}
            log.info("rank %d: %s given (%s), not trained", runtime.rank, stage, source)
            continue
        if cached.get("action") == "load":
            record, handoff[stage] = load_stage_entry(Path(cached["path"]), runtime.rank)
            result["stages"][stage] = {"source": "reused", "key": cached["key"],
                                       "trained_by": record["trained_by"]}  # fmt: skip
            result["metrics"].update({**record["metrics"], f"{stage}/reused": 1})
            series.update(record["series"])
            log.info("rank %d: %s reused from the stage cache (%s)", runtime.rank, stage,
                     cached["path"])  # fmt: skip
            continue
        log.info("rank %d: %s (%d steps)", runtime.rank, stage, steps)
        metrics, handoff[stage], losses = run(ctx)
        _release_memory()
        result["stages"][stage] = {"source": "trained", "steps": steps}
        stage_series = {f"{stage}/loss": losses, f"time/{stage}_s": ctx.timer.series(stage),
                        f"{stage}/skipped": ctx.skipped_series(stage, steps)}  # fmt: skip
        result["metrics"].update(metrics)
        series.update(stage_series)
        if cached.get("action") == "save" and runtime.is_main:
            record = {"metrics": metrics, "series": stage_series,
                      "trained_by": str(out_dir) if out_dir else None}  # fmt: skip
            save_stage_entry(Path(cached["path"]), handoff[stage], record)
    log.info("rank %d: PPO (%d steps)", runtime.rank, config.ppo.steps)
    # run_ppo drops the hand-off once the engines hold it.
    ppo_metrics, ppo_series, result["samples"] = run_ppo(ctx, handoff, plan.get(START))
    _release_memory()
    result["metrics"].update(ppo_metrics)
    for role, engine in ctx.engines.items():
        for name in ("parameters", "trainable_parameters"):
            result["metrics"][f"model/{role}/{name}"] = engine[name]
    result["engines"] = ctx.engines
    # Where a trial's time goes outside the stages' timed steps (benchmarks/trial_wall.py).
    result["metrics"]["time/data_s"] = data_s
    for phase in ("setup", "eval", "handoff"):
        result["metrics"][f"time/{phase}_s"] = ctx.timer.seconds(phase, [0])
    result["series"] = {
        **series,
        **ppo_series,
        "ppo/skipped": ctx.skipped_series("ppo", config.ppo.steps),
    }
    gpu_name = (
        torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else None
    )
    peak = peak_tflops(gpu_name, config.precision, config.peak_tflops)
    if peak:
        result["metrics"]["perf/peak_tflops"] = peak
        result["metrics"].update(mfu_metrics(result["metrics"], peak))


def _measured_state_metrics(engine_states: dict) -> dict[str, int]:
    """`mem/<engine>/measured_*_bytes` from the live-engine probe (device + host)."""
    metrics = {}
    for role, categories in engine_states.items():
        totals = {name: place["device"] + place["host"] for name, place in categories.items()}
        metrics[f"mem/{role}/measured_model_states_bytes"] = (
            totals["params"] + totals["grads"] + totals["optimizer"]
        )
        metrics[f"mem/{role}/measured_buffers_bytes"] = totals["buffers"]
    return metrics


def run_trial(
    config: TrialConfig,
    out_dir: str | Path | None = None,
    process_started: float | None = None,
    plan: dict | None = None,
    forked: bool = False,
) -> dict:
    """Run one trial in this process (one rank of it); returns the result rank 0 writes.

    Failures become a status and a one-line reason (the traceback goes to the log).
    `process_started` (epoch seconds) adds the process's wall time since then, imports included;
    `plan` is the stage-cache plan (the launcher's DIR/stages.json); `forked`: this process was
    forked from a zygote (tunelab.pipeline.zygote), its imports done there before it started.
    """
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {
        "status": Status.OK,
        "reason": "",
        "config": config.to_dict(),
        "metrics": {},
        "series": {},
    }
    runtime = memory = None
    try:
        runtime = start_runtime(config)
        memory = MemoryTracker(runtime.device)
        _run_stages(config, runtime, memory, out_dir, result, plan or {})
    except Exception as exc:  # every failure is classified; the traceback goes to the log
        result["status"], result["reason"] = classify(exc)
        log.error("trial %s: %s\n%s", result["status"], result["reason"], traceback.format_exc())
    finally:
        if memory is not None:
            memory.close()
    rank = runtime.rank if runtime is not None else int(os.environ.get("RANK", "0"))
    rank_info = {"rank": rank, "status": result["status"], "reason": result["reason"]}
    if memory is not None:
        rank_info.update(memory.metrics())
    if "memory" in result:
        rank_info.update(_measured_state_metrics(result["memory"]["measured"]))
    if out_dir is not None:
        (out_dir / f"rank{rank}.json").write_text(json.dumps(rank_info, indent=1))
    # Gather only when every rank got through: a failed rank may leave the others in a collective.
    if result["status"] == Status.OK and runtime is not None:
        ranks = runtime.all_gather(rank_info)
    else:
        ranks = [rank_info]
    result["ranks"] = ranks
    result["metrics"]["time/trial_s"] = time.perf_counter() - started
    result["metrics"]["trial/ranks"] = config.ranks
    result["metrics"]["trial/cpu_threads"] = torch.get_num_threads()  # per rank
    result["metrics"]["trial/forked"] = int(forked)
    if process_started is not None:
        result["metrics"]["time/process_s"] = time.time() - process_started
    for key in {k for info in ranks for k in info if k.startswith("mem/")}:
        result["metrics"][key] = max(info.get(key, 0) for info in ranks)
    for key in {k for k in rank_info if k.startswith("gpu/")}:
        result["metrics"][key] = rank_info[key]
    if out_dir is not None and rank == 0:
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    return result


def _exit_with_parent() -> None:
    """End this process when the process that launched the trial dies (also through torchrun,
    whose workers would otherwise outlive a killed orchestrator)."""
    watched = os.environ.get(WATCH_ENV)
    if watched:
        pid, started = watched.split(":")
        try:
            owner = psutil.Process(int(pid))
        except psutil.NoSuchProcess:
            os._exit(3)
        if f"{owner.create_time():.2f}" != started:
            os._exit(3)
    else:
        owner = psutil.Process(os.getppid())

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if not owner.is_running():
                os._exit(3)

    threading.Thread(target=watch, name="tunelab-parent-watch", daemon=True).start()


def _quiet_libraries() -> None:
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None, process_started: float | None = None,
         forked: bool = False) -> int:  # fmt: skip
    """`process_started`: epoch seconds at the entry point's first line, or at the fork
    (time/process_s); `forked`: from a zygote (trial/forked)."""
    parser = argparse.ArgumentParser(prog="tunelab.pipeline")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    _exit_with_parent()
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s tunelab[rank{rank}] %(message)s",
        stream=sys.stderr,
    )
    _quiet_libraries()
    config = config_from_dict(json.loads(args.config.read_text()), f"{args.config}:")
    plan_file = args.out / STAGE_PLAN
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    remember_cpu_info()
    freeze_imported_objects()
    result = run_trial(config, args.out, process_started, plan, forked)
    if result["status"] == Status.OK and dist.is_initialized():
        # Every rank got through, so none waits in a collective: leave the group before exit
        # (NCCL warns, and may hang at exit, when it is left open).
        dist.destroy_process_group()
    log.info("status %s %s", result["status"], result["reason"])
    return 0 if result["status"] == Status.OK else 3
