"""What stage reuse saves: one PPO-coefficient study run twice, side by side in one run.

    python benchmarks/stage_reuse.py [--trials 6] [--spec studies/ppo-coefficients.yaml]
                                     [--stage-steps 40 200] [--other CHECKOUT]

Runs `tunelab run` on the spec as shipped (`measure: [ppo]`: SFT and RM trained once and
reused) and on the same spec measuring every stage (each trial trains SFT and RM again, as
every trial did before stage reuse), same sampler seed and budget, without confirmation runs,
each in a fresh folder.
Records the command wall times, the trials' own wall times and how many trials reused their
SFT and RM. Answers are fixed-length (ppo.min_answer_len = max), so a trial's PPO time does
not follow its sampled trajectory; `--stage-steps` runs the pair once per SFT/RM step count
(the shipped spec trains 40 each; a real SFT or reward-model run is far longer than its PPO
study's trials). `--other` (e.g. `git worktree add --detach /tmp/orig f63ad04`, the code
before stage reuse and the start-up cuts) also runs the same study with that checkout's code:
the spec without the keys it does not know (`measure`, `confirm`), the base config likewise
(`lora_learning_rate`, unused without LoRA). Writes reports/bench/stage_reuse.{json,md}.
Timings: run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import optuna
import yaml

from tunelab.records import trial_metrics

ROOT = Path(__file__).resolve().parents[1]
MODES = {"reuse": ["ppo"], "no reuse": ["sft", "rm", "ppo"]}
NEW_SPEC_KEYS = ("measure", "confirm")  # what `--other` (before stage reuse) does not know
NEW_ENGINE_KEYS = ("lora_learning_rate",)


def run_study(spec_path: Path, trials: int, measure: list[str] | None, stage_steps: int,
              folder: Path, tree: Path = ROOT) -> dict:  # fmt: skip
    """Run the spec with `trials` trials measuring `measure` with the code of `tree` (None:
    an earlier checkout without stage reuse); wall time and trial figures."""
    spec = yaml.safe_load(spec_path.read_text())
    base = yaml.safe_load((spec_path.parent / spec["base"]).read_text())
    answer = spec["base_overrides"].get("ppo.max_answer_len", base["ppo"]["max_answer_len"])
    spec.update(budget={"trials": trials}, measure=measure, confirm={"top_k": 0},
                base=str(folder / "base.yaml"))  # fmt: skip
    spec["base_overrides"] = {**spec["base_overrides"], "sft.steps": stage_steps,
                              "rm.steps": stage_steps, "ppo.min_answer_len": answer}  # fmt: skip
    spec["name"] = f"{spec['name']}-{'-'.join(measure or ['before'])}"
    if measure is None:
        spec = {k: v for k, v in spec.items() if k not in NEW_SPEC_KEYS}
        for role in ("actor", "critic"):
            base[role] = {k: v for k, v in base[role].items() if k not in NEW_ENGINE_KEYS}
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
    if measure is None:  # stored its own way: the trials' wall times from Optuna
        metrics = [{"time/process_s": t.duration.total_seconds(),
                    "ppo/gold_gain": t.values[0] if t.values else float("nan")}
                   for t in study.trials]  # fmt: skip
    else:
        metrics = [trial_metrics(trial.user_attrs) for trial in study.trials]
    return {
        "checkout": _commit(tree),
        "measure": measure,
        "stage_steps": stage_steps,
        "command_wall_s": wall,
        "trial_walls_s": [m["time/process_s"] for m in metrics],
        "reused_trials": sum(m.get("sft/reused", 0) == 1 for m in metrics),
        "gold_gains": [m["ppo/gold_gain"] for m in metrics],
    }


def _commit(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--spec", default="studies/ppo-coefficients.yaml")
    parser.add_argument("--stage-steps", type=int, nargs="+", default=[40])
    parser.add_argument("--other", type=Path, help="an earlier checkout, without stage reuse")
    args = parser.parse_args()
    modes = {**MODES, **({"before": None} if args.other else {})}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.stage_steps:
            for label, measure in modes.items():
                folder = Path(tmp) / f"{label.replace(' ', '-')}-{steps}"
                folder.mkdir()
                tree = args.other if measure is None else ROOT
                results.append(
                    run_study(ROOT / args.spec, args.trials, measure, steps, folder, tree)
                )

    def wall(steps, measure):
        return next(r["command_wall_s"] for r in results
                    if r["stage_steps"] == steps and r["measure"] == measure)  # fmt: skip

    ratios = {steps: wall(steps, ["ppo"]) / wall(steps, MODES["no reuse"])
              for steps in args.stage_steps}  # fmt: skip
    before = {steps: wall(steps, ["ppo"]) / wall(steps, None)
              for steps in args.stage_steps} if args.other else {}  # fmt: skip
    record = {
        "command": "python benchmarks/stage_reuse.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}",
        "results": results,
        "wall_ratio": ratios,
        "wall_ratio_to_other": before,
    }
    out = ROOT / "reports" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage_reuse.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# Stage reuse: {args.spec}, {args.trials} trials", "",
             f"`{record['command'].strip()}` on {record['date']} ({record['machine']}).", "",
             "| SFT/RM steps | checkout | measure | study wall (s) | trial walls (s) | "
             "trials reusing |", "|---|---|---|---|---|---|"]  # fmt: skip
    for result in results:
        walls = ", ".join(f"{w:.1f}" for w in result["trial_walls_s"])
        measure = result["measure"] or "(all; no stage reuse)"
        lines.append(f"| {result['stage_steps']} | {result['checkout']} | {measure} | "
                     f"{result['command_wall_s']:.1f} | {walls} | {result['reused_trials']} |")
    lines.append("")
    for steps, ratio in ratios.items():
        lines.append(f"With {steps} SFT and RM steps, the study's wall time with reuse is "
                     f"{ratio:.2f}x of the same study without it (same sampler seed, so the "
                     "same PPO coefficients).")  # fmt: skip
    for steps, ratio in before.items():
        lines.append(f"With {steps} SFT and RM steps, the study's wall time with reuse is "
                     f"{ratio:.2f}x of the same study run by {_commit(args.other)}.")  # fmt: skip
    lines.append("")
    (out / "stage_reuse.md").write_text("\n".join(lines))
    print((out / "stage_reuse.md").read_text())


if __name__ == "__main__":
    main()
