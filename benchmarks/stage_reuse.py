"""What stage reuse saves: one PPO-coefficient study run twice, side by side in one run.

    python benchmarks/stage_reuse.py [--trials 6] [--spec studies/ppo-coefficients.yaml]
                                     [--stage-steps 40 200]

Runs `tunelab run` on the spec as shipped (`measure: [ppo]`: SFT and RM trained once and
reused) and on the same spec measuring every stage (each trial trains SFT and RM again, as
every trial did before stage reuse), same sampler seed and budget, without confirmation runs,
each in a fresh folder.
Records the command wall times, the trials' own wall times and how many trials reused their
SFT and RM. Answers are fixed-length (ppo.min_answer_len = max), so a trial's PPO time does
not follow its sampled trajectory; `--stage-steps` runs the pair once per SFT/RM step count
(the shipped spec trains 40 each; a real SFT or reward-model run is far longer than its PPO
study's trials). Writes reports/bench/stage_reuse.{json,md}. Timings: run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
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


def run_study(spec_path: Path, trials: int, measure: list[str], stage_steps: int,
              folder: Path) -> dict:  # fmt: skip
    """Run the spec with `trials` trials measuring `measure`; wall time and trial figures."""
    spec = yaml.safe_load(spec_path.read_text())
    spec.update(budget={"trials": trials}, measure=measure, confirm={"top_k": 0},
                base=str((spec_path.parent / spec["base"]).resolve()))  # fmt: skip
    base = yaml.safe_load(Path(spec["base"]).read_text())
    answer = spec["base_overrides"].get("ppo.max_answer_len", base["ppo"]["max_answer_len"])
    spec["base_overrides"] = {**spec["base_overrides"], "sft.steps": stage_steps,
                              "rm.steps": stage_steps, "ppo.min_answer_len": answer}  # fmt: skip
    spec["name"] = f"{spec['name']}-{'-'.join(measure)}"
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    started = time.perf_counter()
    argv = [sys.executable, "-m", "tunelab", "run", str(path), "--out", str(folder / "out")]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"study failed:\n{run.stderr[-3000:]}")
    study = optuna.load_study(study_name=spec["name"],
                              storage=f"sqlite:///{folder / 'out' / 'study.db'}")  # fmt: skip
    metrics = [trial_metrics(trial.user_attrs) for trial in study.trials]
    return {
        "measure": measure,
        "stage_steps": stage_steps,
        "command_wall_s": wall,
        "trial_walls_s": [m["time/process_s"] for m in metrics],
        "reused_trials": sum(m.get("sft/reused", 0) == 1 for m in metrics),
        "gold_gains": [m["ppo/gold_gain"] for m in metrics],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--spec", default="studies/ppo-coefficients.yaml")
    parser.add_argument("--stage-steps", type=int, nargs="+", default=[40])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.stage_steps:
            for label, measure in MODES.items():
                folder = Path(tmp) / f"{label.replace(' ', '-')}-{steps}"
                folder.mkdir()
                results.append(run_study(ROOT / args.spec, args.trials, measure, steps, folder))
    ratios = {
        steps: next(r for r in results if r["stage_steps"] == steps and r["measure"] == ["ppo"])[
            "command_wall_s"] / next(r for r in results if r["stage_steps"] == steps
                                     and r["measure"] != ["ppo"])["command_wall_s"]
        for steps in args.stage_steps
    }  # fmt: skip
    record = {
        "command": "python benchmarks/stage_reuse.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}",
        "results": results,
        "wall_ratio": ratios,
    }
    out = ROOT / "reports" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage_reuse.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# Stage reuse: {args.spec}, {args.trials} trials", "",
             f"`{record['command'].strip()}` on {record['date']} ({record['machine']}).", "",
             "| SFT/RM steps | measure | study wall (s) | trial walls (s) | trials reusing |",
             "|---|---|---|---|---|"]  # fmt: skip
    for result in results:
        walls = ", ".join(f"{w:.1f}" for w in result["trial_walls_s"])
        lines.append(f"| {result['stage_steps']} | {result['measure']} | "
                     f"{result['command_wall_s']:.1f} | {walls} | {result['reused_trials']} |")
    lines.append("")
    for steps, ratio in ratios.items():
        lines.append(f"With {steps} SFT and RM steps, the study's wall time with reuse is "
                     f"{ratio:.2f}x of the same study without it (same sampler seed, so the "
                     "same PPO coefficients).")  # fmt: skip
    lines.append("")
    (out / "stage_reuse.md").write_text("\n".join(lines))
    print((out / "stage_reuse.md").read_text())


if __name__ == "__main__":
    main()
