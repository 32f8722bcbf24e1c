"""PPO step time, this checkout side by side with another one (e.g. an earlier commit).

    git worktree add --detach /tmp/orig f63ad04
    python benchmarks/ppo_step.py --other /tmp/orig [--repeats 3]

The tiny OPT-shaped preset (2 layers, hidden 64), bf16, optimizer offload, batch 4, 32 prompt
+ 32 answer tokens (fixed length), 8 PPO steps after 1 warm-up, at ZeRO-2 and ZeRO-3; runs
alternate between the two checkouts so both see the same machine load. Both get
OMP_NUM_THREADS=1, so the figure compares code, not thread policy. Decoding: this checkout both
samples (as the other does) and decodes greedily (`ppo.decoding: greedy`, DeepSpeed-Chat's way).
Writes reports/bench/ppo_step.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from checkout import record_header, short_commit

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["precision=bf16", "actor.offload_optimizer=cpu", "critic.offload_optimizer=cpu",
            "batch.train_micro=4", "batch.generation_micro=4", "ppo.max_prompt_len=32",
            "ppo.max_answer_len=32", "ppo.min_answer_len=32", "sft.steps=2", "rm.steps=2",
            "ppo.steps=9", "warmup_steps=1", "data.eval_size=8"]  # fmt: skip
PHASES = ("time/ppo_step_s", "time/ppo_generate_s", "time/ppo_experience_s", "time/ppo_train_s")


def run(tree: Path, overrides: list[str]) -> dict[str, float]:
    """One `tunelab trial` from checkout `tree`; its per-step PPO phase times."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "tunelab", "trial", "studies/trials/tiny.yaml",
                        "--out", out, *SETTINGS, *overrides], cwd=tree, env=env, check=True,
                       capture_output=True)  # fmt: skip
        metrics = json.loads((Path(out) / "metrics.json").read_text())["metrics"]
    steps = metrics["ppo/steps"] - 1  # the phases' totals cover the timed steps
    return {"ppo_step_s": metrics["time/ppo_step_s"],
            **{p.split("/")[1]: metrics[p] / steps for p in PHASES[1:]}}  # fmt: skip


def alternating_medians(measures: dict[str, Callable[[], dict]], repeats: int) -> list[dict]:
    """Each of `measures` run `repeats` times, taking turns so all see the same machine load;
    a row per measure: its name (`variant`), the median of each figure, the steps' runs."""
    runs: dict[str, list[dict]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            runs[name].append(measure())
    return [{"variant": name,
             **{k: statistics.median(m[k] for m in measured) for k in measured[0]},
             "step_s_runs": [m["ppo_step_s"] for m in measured]}
            for name, measured in runs.items()]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--other", type=Path, required=True, help="the checkout to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    other, here = short_commit(args.other), short_commit(ROOT)
    variants = {f"{other}": (args.other, []), f"{here} (sample)": (ROOT, []),
                f"{here} (greedy)": (ROOT, ["ppo.decoding=greedy"])}  # fmt: skip
    rows = []
    for zero in (2, 3):
        zero_overrides = [f"actor.zero_stage={zero}", f"critic.zero_stage={zero}"]
        measures = {name: functools.partial(run, tree, zero_overrides + extra)
                    for name, (tree, extra) in variants.items()}  # fmt: skip
        rows += [{"zero": zero, **row} for row in alternating_medians(measures, args.repeats)]
    record = {
        **record_header(),
        "rows": rows,
    }
    out = ROOT / "reports" / "bench"
    (out / "ppo_step.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["# PPO step time side by side", "",
             f"`{record['command'].strip()}` on {record['date']} ({record['machine']}); "
             f"medians of {args.repeats} alternating runs, seconds per step.", "",
             "| ZeRO | checkout | step (s) | x of " + other + " | generate | experience | "
             "train | runs (s) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        base = next(r for r in rows if r["zero"] == row["zero"] and r["variant"] == other)
        runs_text = ", ".join(f"{s:.3f}" for s in row["step_s_runs"])
        lines.append(f"| {row['zero']} | {row['variant']} | {row['ppo_step_s']:.3f} | "
                     f"{row['ppo_step_s'] / base['ppo_step_s']:.2f} | "
                     f"{row['ppo_generate_s']:.3f} | {row['ppo_experience_s']:.3f} | "
                     f"{row['ppo_train_s']:.3f} | {runs_text} |")  # fmt: skip
    (out / "ppo_step.md").write_text("\n".join(lines) + "\n")
    print((out / "ppo_step.md").read_text())


if __name__ == "__main__":
    main()
