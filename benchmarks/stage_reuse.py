"""What stage reuse and early stops save: one PPO-coefficient study run in several ways, side
by side in one run.

    python benchmarks/stage_reuse.py [--trials 6] [--spec studies/ppo-coefficients.yaml]
                                     [--stage-steps 40 200] [--other CHECKOUT] [--modes ...]
                                     [--repeats 1]

Runs `tunelab run` on the spec as shipped (`measure: [ppo]`: SFT and RM trained once and
reused; its pruner and constraint stop lines: early stops; one-rank trials forked from a zygote
that has imported torch & co.), the same without early stops, the same measuring every stage
(each trial trains SFT and RM again, as every trial did before stage reuse) with early stops,
and the shipped one with a fresh process per trial (`resources.preload: false`); same sampler
seed and budget, without confirmation runs, each in a fresh folder. Records the command wall
times, the trials' wall times (Optuna's start to end), how many trials' records say they loaded
SFT, RM and PPO's start from the stage cache, and how many stopped early. Answers are
fixed-length (ppo.min_answer_len = max), so a trial's PPO time does not follow its sampled
trajectory; `--stage-steps` runs the set once per SFT/RM step count (the shipped spec trains
40 each; a real SFT or reward-model run is far longer than its PPO study's trials). `--other`
(e.g. `git worktree add --detach /tmp/orig f63ad04`, the code before stage reuse, early stops
on the reward and the start-up cuts) also runs the same study with that checkout's code: the
spec without what it does not know (`measure`, `confirm`, the pruner, constraint stop margins),
the base config likewise (`lora_learning_rate`, unused without LoRA).
`--repeats N` runs every study N times in rounds (each round all of them, one after another)
and gives each ratio as the median of its rounds' ratios: this machine's speed drifts by tens
of percent within minutes, and a ratio within one round compares studies run close together.
Writes reports/bench/stage_reuse.{json,md}. Timings: run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml
from checkout import record_header, short_commit

from tunelab.records import trial_metrics
from tunelab.stagecache import START_REUSED

ROOT = Path(__file__).resolve().parents[1]
# label: (stages measured, early stops, trials forked from a zygote: resources.preload);
# BEFORE runs the other checkout's code, with none of them
MODES = {"reuse + early stops": (["ppo"], True, True), "reuse": (["ppo"], False, True),
         "no reuse + early stops": (["sft", "rm", "ppo"], True, True),
         "reuse + early stops, fresh processes": (["ppo"], True, False)}  # fmt: skip
BEFORE = "no reuse, no early stops"
REUSE_METRICS = ("sft/reused", "rm/reused", START_REUSED)  # what a trial loaded from the cache
NEW_SPEC_KEYS = ("measure", "confirm", "pruner")  # what `--other` does not know
NEW_ENGINE_KEYS = ("lora_learning_rate",)


def run_study(spec_path: Path, trials: int, measure: list[str] | None, early_stops: bool,
              preload: bool, stage_steps: int, folder: Path,
              tree: Path = ROOT) -> dict:  # fmt: skip
    """Run the spec with `trials` trials measuring `measure` (None: an earlier checkout
    without stage reuse or zygotes) with the code of `tree`, with or without its early stops
    (pruner, constraint stop margins) and zygotes; wall time and trial figures."""
    spec = yaml.safe_load(spec_path.read_text())
    base = yaml.safe_load((spec_path.parent / spec["base"]).read_text())
    answer = spec["base_overrides"].get("ppo.max_answer_len", base["ppo"]["max_answer_len"])
    spec.update(budget={"trials": trials}, measure=measure, confirm={"top_k": 0},
                base=str(folder / "base.yaml"))  # fmt: skip
    spec["base_overrides"] = {**spec["base_overrides"], "sft.steps": stage_steps,
                              "rm.steps": stage_steps, "ppo.min_answer_len": answer}  # fmt: skip
    spec["name"] = f"{spec['name']}-{'-'.join(measure or ['before'])}"
    if not early_stops:
        spec.pop("pruner", None)
        spec["constraints"] = [{k: v for k, v in c.items() if k != "stop_margin"}
                               for c in spec.get("constraints", [])]  # fmt: skip
    if measure is None:
        spec = {k: v for k, v in spec.items() if k not in NEW_SPEC_KEYS}
        for role in ("actor", "critic"):
            base[role] = {k: v for k, v in base[role].items() if k not in NEW_ENGINE_KEYS}
    else:
        spec["resources"] = {**spec.get("resources", {}), "preload": preload}
    (folder / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    started = time.perf_counter()
    argv = [sys.executable, "-m", "tunelab", "run", str(path), "--out", str(folder / "out")]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    run = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"study failed:\n{run.stderr[-3000:]}")
    study = optuna.load_study(study_name=spec["name"],
                              storage=f"sqlite:///{folder / 'out' / 'study.db'}")  # fmt: skip
    return {
        "checkout": short_commit(tree),
        "measure": measure,
        "early_stops": early_stops,
        "preload": preload,
        "stage_steps": stage_steps,
        "command_wall_s": wall,
        "trial_walls_s": [t.duration.total_seconds() for t in study.trials],
        "reused_trials": {name: _count(study.trials, name) for name in REUSE_METRICS},
        "stopped_early": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        "gold_gains": [t.values[0] if t.state == optuna.trial.TrialState.COMPLETE else None
                       for t in study.trials],  # a pruned trial's value is an intermediate one
    }


def _count(trials: list[optuna.trial.FrozenTrial], metric: str) -> int:
    """Trials whose record says `metric` (a trial stopped early too: its record keeps what its
    plan loaded, stagecache.reuse_metrics); none before stage reuse."""
    return sum(bool(trial_metrics(t.user_attrs).get(metric)) for t in trials)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--spec", default="studies/ppo-coefficients.yaml")
    parser.add_argument("--stage-steps", type=int, nargs="+", default=[40])
    parser.add_argument("--other", type=Path, help="an earlier checkout, without stage reuse")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="which of this checkout's studies to run (the first is shipped)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all the studies")
    args = parser.parse_args()
    if args.repeats < 1 or args.trials < 1:
        parser.error("--repeats and --trials take a whole number of at least 1")
    modes = {label: (*MODES[label], ROOT) for label in args.modes}
    if args.other:
        modes[BEFORE] = (None, False, False, args.other)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for steps in args.stage_steps:
                for i, (label, (measure, early_stops, preload, tree)) in enumerate(modes.items()):
                    folder = Path(tmp) / f"round{repeat}-mode{i}-{steps}"
                    folder.mkdir()
                    result = run_study(ROOT / args.spec, args.trials, measure, early_stops,
                                       preload, steps, folder, tree)  # fmt: skip
                    results.append({"mode": label, "round": repeat, **result})

    def wall(steps, mode, repeat):
        return next(r["command_wall_s"] for r in results if r["stage_steps"] == steps
                    and r["mode"] == mode and r["round"] == repeat)  # fmt: skip

    shipped = next(iter(modes))
    round_ratios = {steps: {mode: [wall(steps, shipped, n) / wall(steps, mode, n)
                                   for n in range(args.repeats)]
                            for mode in modes if mode != shipped}
                    for steps in args.stage_steps}  # fmt: skip
    ratios = {steps: {mode: statistics.median(each) for mode, each in against.items()}
              for steps, against in round_ratios.items()}  # fmt: skip
    record = {
        **record_header(),
        "results": results,
        "wall_ratio_of_shipped": ratios,
        "wall_ratio_of_shipped_per_round": round_ratios,
    }
    out = ROOT / "reports" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage_reuse.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# Stage reuse and early stops: {args.spec}, {args.trials} trials", "",
             f"`{record['command'].strip()}` on {record['date']} ({record['machine']}).", "",
             "| round | SFT/RM steps | study | checkout | study wall (s) | trial walls (s) | "
             "trials reusing SFT / RM / PPO's start | stopped early | gold gains |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for result in results:
        walls = ", ".join(f"{w:.1f}" for w in result["trial_walls_s"])
        gains = ", ".join("-" if g is None else f"{g:.2f}" for g in result["gold_gains"])
        lines.append(f"| {result['round']} | {result['stage_steps']} | {result['mode']} | "
                     f"{result['checkout']} | "
                     f"{result['command_wall_s']:.1f} | {walls} | "
                     f"{' / '.join(map(str, result['reused_trials'].values()))} | "
                     f"{result['stopped_early']} | {gains} |")  # fmt: skip
    lines.append("")
    for steps, against in ratios.items():
        for mode, ratio in against.items():
            by = f" ({short_commit(args.other)})" if mode == BEFORE else ""
            each = ", ".join(f"{r:.2f}" for r in round_ratios[steps][mode])
            lines.append(f"With {steps} SFT and RM steps, the shipped study ({shipped}) "
                         f"takes {ratio:.2f}x the wall time of the study run as '{mode}'{by}"
                         f" (median of the rounds' ratios: {each}).")
    lines.append("")
    (out / "stage_reuse.md").write_text("\n".join(lines))
    print((out / "stage_reuse.md").read_text())


if __name__ == "__main__":
    main()
