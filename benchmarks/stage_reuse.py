"""What stage reuse saves: one PPO-coefficient study run twice, side by side in one run.

    python benchmarks/stage_reuse.py [--trials 6] [--spec studies/ppo-coefficients.yaml]

Runs `tunelab run` on the spec as shipped (`measure: [ppo]`: SFT and RM trained once and
reused) and on the same spec measuring every stage (each trial trains SFT and RM again, as
every trial did before stage reuse), same sampler seed and budget, without confirmation runs,
each in a fresh folder.
Records the command wall times, the trials' own wall times and how many trials reused their
SFT and RM. Writes reports/bench/stage_reuse.{json,md}. Timings: run on a quiet machine.
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


def run_study(spec_path: Path, trials: int, measure: list[str], folder: Path) -> dict:
    """Run the spec with `trials` trials measuring `measure`; wall time and trial figures."""
    spec = yaml.safe_load(spec_path.read_text())
    spec.update(budget={"trials": trials}, measure=measure, confirm={"top_k": 0},
                base=str((spec_path.parent / spec["base"]).resolve()))  # fmt: skip
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
        "command_wall_s": wall,
        "trial_walls_s": [m["time/process_s"] for m in metrics],
        "reused_trials": sum(m.get("sft/reused", 0) == 1 for m in metrics),
        "gold_gains": [m["ppo/gold_gain"] for m in metrics],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--spec", default="studies/ppo-coefficients.yaml")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, measure in MODES.items():
            folder = Path(tmp) / label.replace(" ", "-")
            folder.mkdir()
            results[label] = run_study(ROOT / args.spec, args.trials, measure, folder)
    ratio = results["reuse"]["command_wall_s"] / results["no reuse"]["command_wall_s"]
    record = {
        "command": "python benchmarks/stage_reuse.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}",
        "results": results,
        "wall_ratio": ratio,
    }
    out = ROOT / "reports" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage_reuse.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# Stage reuse: {args.spec}, {args.trials} trials", "",
             f"`{record['command'].strip()}` on {record['date']} ({record['machine']}).", "",
             "| measure | study wall (s) | trial walls (s) | trials reusing SFT+RM |",
             "|---|---|---|---|"]  # fmt: skip
    for result in results.values():
        walls = ", ".join(f"{w:.1f}" for w in result["trial_walls_s"])
        lines.append(f"| {result['measure']} | {result['command_wall_s']:.1f} | {walls} | "
                     f"{result['reused_trials']} |")  # fmt: skip
    lines += ["", f"Study wall time with reuse: {ratio:.2f}x of the same study without it "
              "(same sampler seed, so the same PPO coefficients).", ""]  # fmt: skip
    (out / "stage_reuse.md").write_text("\n".join(lines))
    print((out / "stage_reuse.md").read_text())


if __name__ == "__main__":
    main()
