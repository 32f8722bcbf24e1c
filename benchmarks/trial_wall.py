"""Where one tiny trial's wall time goes, imports included.

    python benchmarks/trial_wall.py [--repeats 3] [--config studies/trials/tiny.yaml]

Runs `tunelab trial <config>` (a fresh process each time) and splits the wall time measured
around the command with the trial's own figures (`time/*` metrics):
  start     command wall - time/process_s: `tunelab trial` and the interpreter starting up to
            the trial entry point's first line, process exit
  imports   time/process_s - time/trial_s: torch, DeepSpeed, transformers, peft, distributed init
  data      time/data_s: synthetic data, tokenizer, encoding
  setup     time/setup_s: models built and six DeepSpeed engines initialised
  eval      time/eval_s: held-out RM accuracy, PPO start and end evaluation
  handoff   time/handoff_s: consolidating SFT and RM weights for the next stage
  steps     the rest of time/trial_s: every SFT, RM and PPO step (warm-up included)
Then runs the same trial forked from one zygote (tunelab.zygote), as a study's one-rank trials
run, and splits it the same way. Also keeps what the trial learned (QUALITY: SFT loss, RM
held-out accuracy, gold reward, first and last), the figures README quotes for the tiny preset.
Then times the imports alone, in a fresh process each repeat, one library after another in the
order a trial needs them (IMPORT_STEPS): what each adds once the ones before it are loaded.
Writes reports/bench/trial_wall.{json,md}. Timings: run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from checkout import record_header

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("start", "imports", "data", "setup", "eval", "handoff", "steps")
QUALITY = ("sft/loss_first", "sft/loss_final", "rm/eval_accuracy_start", "rm/eval_accuracy",
           "rm/eval_pairs", "ppo/gold_start", "ppo/gold_end", "ppo/steps")  # fmt: skip
# Each adds its own modules to what the steps before loaded; transformers' share covers the
# OPT model classes and generation code every tiny trial uses.
IMPORT_STEPS = {
    "torch": "import torch",
    "transformers": "import transformers.models.opt.modeling_opt, transformers.generation",
    "peft": "import peft",
    "deepspeed": "import deepspeed",
    "deepspeed muon": "import deepspeed.runtime.zero.muon.muon_optimizer",
    "tunelab.pipeline": "import tunelab.pipeline.run",
}
IMPORT_TIMER = """
import json, time
seconds = {}
for name, statement in STEPS.items():
    started = time.perf_counter()
    exec(statement)
    seconds[name] = time.perf_counter() - started
print(json.dumps(seconds))
"""
# Found with `python -m cProfile -m tunelab.pipeline --config DIR/trial.json --out DIR` and
# `python -X importtime`; the numbers are the 2-core machine's (2026-11-29).
LEFT_OUTSIDE = [
    "## What was cut, and what is left outside the steps", "",
    "- Cut (tunelab/pipeline/startup.py): DeepSpeed's op builders asked py-cpuinfo for the CPU "
    "twice per trial, a Python subprocess of 1.1 s each (now kept in a file per CPU); "
    "`gc.collect()` calls (DeepSpeed's optimizers, tunelab's memory release) walked every "
    "imported object, 0.3 s a call (imports now run with the collector off, their objects "
    "frozen). The median wall was 12.59 s with 3.98 s of setup before (commit fd61876).",
    "- Cut on 2026-11-30 evening: a forked child's first collection walked the heap it "
    "inherited from the zygote and copied every page holding an object (1.40 s, timed in a "
    "child of a process that imported what a zygote does; 0.1 ms once the zygote collects "
    "and freezes before forking, tunelab/pipeline/zygote.py); data encoded each text with a "
    "tokenizer call of its own (the tiny trial's data 1.3 s, now 0.5 s with one batched call "
    "per kind of text, tunelab/pipeline/batching.py; both timed on this machine, alternating). "
    "The afternoon's table (commit bfc2a83, a machine where a fresh trial took 26.5 s): the "
    "forked child's set-up 1.11 s, data 1.57 s.",
    "- imports (table above): torch and transformers are most of them; peft adds little once "
    "transformers' modules are loaded (`python -X importtime` credits them to peft when peft "
    "comes first). Every trial is its own process (isolation: memory, CUDA state, a crash ends "
    "one trial). A study's one-rank trials fork from a zygote that imported torch, "
    "transformers and peft once, and DeepSpeed with its Muon module where no GPU is visible "
    "(DeepSpeed's import starts the CUDA runtime, after which a forked child cannot use CUDA; "
    "a child that finds the driver loaded starts a fresh process instead). Multi-rank trials "
    "start fresh through torchrun or the DeepSpeed launcher.",
    "- setup and the first step of each stage: DeepSpeed imports its Muon optimizer in every "
    "ZeRO and bf16 optimizer constructor, and that module's `torch.compile` decorators import "
    "TorchInductor (`deepspeed muon` in the table above, once per process); cutting it "
    "would mean stubbing a DeepSpeed module, which tunelab does not do.",
    "- eval (held-out accuracy, PPO start/end evaluation) is measurement the study reports; "
    "in a study that reuses SFT and RM, the RM's held-out accuracy and PPO's start come "
    "from the stage cache (tunelab/stagecache.py), so such trials evaluate PPO's end only.", "",
]


def split(wall: float, metrics: dict[str, float]) -> dict[str, float]:
    """The command's wall time in PARTS (see the module docstring); they add up to `wall`."""
    outside = {part: metrics[f"time/{part}_s"] for part in ("data", "setup", "eval", "handoff")}
    return {
        "start": wall - metrics["time/process_s"],
        "imports": metrics["time/process_s"] - metrics["time/trial_s"],
        **outside,
        "steps": metrics["time/trial_s"] - sum(outside.values()),
    }


def forked_runs(config_path: str, repeats: int) -> tuple[float, list[dict[str, float]]]:
    """`repeats` trials forked from one zygote as a study's worker runs them (launch_trial with
    a ZygotePool), after one that waits for the zygote's imports: (that wait, the runs)."""
    from tunelab.config import load_config
    from tunelab.launcher import launch_trial
    from tunelab.zygote import ZygotePool

    config = load_config(ROOT / config_path)
    pool = ZygotePool()
    runs = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            for index in range(repeats + 1):
                outcome = launch_trial(config, Path(folder) / str(index), zygotes=pool)
                if outcome.status != "ok":
                    raise SystemExit(f"forked trial: {outcome.status} {outcome.reason}")
                metrics = outcome.metrics
                runs.append({"wall": outcome.wall_s, **split(outcome.wall_s, metrics),
                             **{name: metrics[name] for name in QUALITY}})  # fmt: skip
    finally:
        pool.close()
    return runs[0]["start"], runs[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default="studies/trials/tiny.yaml")
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "tunelab", "trial", args.config, "--out",
                            folder], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
            wall = time.perf_counter() - started
            metrics = json.loads((Path(folder) / "metrics.json").read_text())["metrics"]
            runs.append({"wall": wall, **split(wall, metrics),
                         **{name: metrics[name] for name in QUALITY}})  # fmt: skip
    median = {key: statistics.median(r[key] for r in runs) for key in ("wall", *PARTS, *QUALITY)}
    zygote_start, forked = forked_runs(args.config, args.repeats)
    forked_median = {key: statistics.median(r[key] for r in forked)
                     for key in ("wall", *PARTS, *QUALITY)}  # fmt: skip
    timer = f"STEPS = {IMPORT_STEPS!r}" + IMPORT_TIMER
    imports = [json.loads(subprocess.run([sys.executable, "-c", timer], cwd=ROOT, check=True,
                                         capture_output=True, text=True).stdout.splitlines()[-1])
               for _ in range(args.repeats)]  # fmt: skip
    import_median = {name: statistics.median(i[name] for i in imports) for name in IMPORT_STEPS}
    record = {
        **record_header(),
        "runs": runs,
        "median_s": median,
        "forked_runs": forked,
        "forked_median_s": forked_median,
        "zygote_first_start_s": zygote_start,
        "import_steps": IMPORT_STEPS,
        "import_s": imports,
        "import_median_s": import_median,
    }
    out = ROOT / "reports" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "trial_wall.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["# Where a tiny trial's wall time goes", "",
             f"`{record['command'].strip()}` on {record['date']} ({record['machine']}).", "",
             "| run | wall (s) | " + " | ".join(f"{p} (s)" for p in PARTS) + " |",
             "|---" * (len(PARTS) + 2) + "|"]  # fmt: skip
    for i, r in enumerate([*runs, median]):
        label = "median" if i == len(runs) else str(i)
        lines.append(f"| {label} | " + " | ".join(f"{r[k]:.2f}" for k in ("wall", *PARTS)) + " |")
    share = 1 - median["steps"] / median["wall"]
    forked_share = 1 - forked_median["steps"] / forked_median["wall"]
    lines += ["", f"Outside the stages' steps: {share:.0%} of the median wall. "
              "Parts as in the module docstring of benchmarks/trial_wall.py.", "",
              f"Forked from one zygote (tunelab.zygote), as a study's one-rank trials run: "
              f"{args.repeats} trials after a first one, whose start also waited "
              f"{zygote_start:.2f} s for the zygote's imports (once per worker and trial "
              "environment). Parts as above; `start` is the fork and `imports` the child's "
              "set-up before the trial (mapping the zygote's library pages, tunelab.pipeline's "
              "main).", "",
              "| run | wall (s) | " + " | ".join(f"{p} (s)" for p in PARTS) + " |",
              "|---" * (len(PARTS) + 2) + "|",
              *(f"| {'median' if i == len(forked) else i} | "
                + " | ".join(f"{r[k]:.2f}" for k in ("wall", *PARTS)) + " |"
                for i, r in enumerate([*forked, forked_median])),
              "", f"Outside the stages' steps, forked: {forked_share:.0%} of the median wall; "
              f"the median wall is {forked_median['wall'] / median['wall']:.2f}x the fresh "
              "process's.", "",
              "What each run learned (the same seed: runs differ only by nondeterminism):", "",
              "| run | " + " | ".join(QUALITY) + " |", "|---" * (len(QUALITY) + 1) + "|",
              *(f"| {i} | " + " | ".join(f"{r[k]:.3g}" for k in QUALITY) + " |"
                for i, r in enumerate(runs)),
              *(f"| forked {i} | " + " | ".join(f"{r[k]:.3g}" for k in QUALITY) + " |"
                for i, r in enumerate(forked)),
              "",
              "Imports alone, one after another (each after the ones above it), median of "
              f"{args.repeats} fresh processes:", "", "| import | adds (s) | statement |",
              "|---|---|---|",
              *(f"| {name} | {import_median[name]:.2f} | `{IMPORT_STEPS[name]}` |"
                for name in IMPORT_STEPS),
              "", "DeepSpeed's Muon module is imported by its first ZeRO or bf16 optimizer, so "
              "a trial counts it in setup, not in imports.", "", *LEFT_OUTSIDE]  # fmt: skip
    (out / "trial_wall.md").write_text("\n".join(lines))
    print((out / "trial_wall.md").read_text())


if __name__ == "__main__":
    main()
