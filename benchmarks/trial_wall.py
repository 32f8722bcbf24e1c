"""Wall time of one tiny trial as a user runs it, imports included.

    python benchmarks/trial_wall.py [--repeats 3]

Runs `tunelab trial studies/trials/tiny.yaml` (a fresh process each time) and records the
wall time measured around the command, plus the trial's own split (process, trial, stages).
Writes reports/bench/trial_wall.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("time/process_s", "time/trial_s", "time/sft_s", "time/rm_s", "time/ppo_e2e_s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "tunelab", "trial", "studies/trials/tiny.yaml", "--out",
                 folder], cwd=ROOT, check=True, capture_output=True,
            )  # fmt: skip
            wall = time.perf_counter() - started
            metrics = json.loads((Path(folder) / "metrics.json").read_text())["metrics"]
            runs.append({"command_wall_s": wall, **{k: metrics[k] for k in PHASES}})
    walls = [r["command_wall_s"] for r in runs]
    record = {
        "command": "python benchmarks/trial_wall.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}",
        "runs": runs,
        "median_wall_s": statistics.median(walls),
    }
    out = ROOT / "reports" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "trial_wall.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["# Tiny trial wall time (imports included)", "",
             f"`{record['command'].strip()}` on {record['date']} ({record['machine']}).", "",
             "| run | command wall (s) | process (s) | trial (s) | SFT (s) | RM (s) | PPO (s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, r in enumerate(runs):
        cells = " | ".join(f"{r[k]:.2f}" for k in ("command_wall_s", *PHASES))
        lines.append(f"| {i} | {cells} |")
    lines += ["", f"Median {record['median_wall_s']:.1f} s. SFT/RM/PPO are the timed steps "
              "after warm-up; the rest is imports, model and engine construction, evaluation.",
              ""]  # fmt: skip
    (out / "trial_wall.md").write_text("\n".join(lines))
    print((out / "trial_wall.md").read_text())


if __name__ == "__main__":
    main()
