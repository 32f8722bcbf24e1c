"""Run-to-run noise of one trial configuration: mean, sd and CV of every objective and stage time.

    python benchmarks/noise.py [--config studies/trials/tiny.yaml] [--repeats 5]
                               [--before 1cd30bc]

Runs `tunelab trial CONFIG seed=<1234 + i>` `--repeats` times as separate processes (trial seeds
1234, 1235, ...: the noise a study meets when it runs one configuration again, SFT, RM and PPO
draws included). With `--before COMMIT` it also runs that commit's code (checked out in a
temporary git worktree, its own copy of CONFIG) the same number of times, interleaved with the
current runs so that load on the machine falls on both alike, and sets the two side by side:
the before/after of evaluating on common random numbers and a larger held-out set.
Writes reports/bench/noise.{json,md}.
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

from checkout import record_header

ROOT = Path(__file__).resolve().parents[1]
FIRST_SEED = 1234
# Objectives a study optimises, and where a trial's time goes.
METRICS = (
    "ppo/gold_gain", "ppo/gold_start", "ppo/gold_end", "ppo/score_gain", "ppo/kl_final",
    "ppo/clip_fraction", "rm/eval_accuracy",
    "perf/sft_tokens_per_s", "perf/rm_tokens_per_s", "perf/ppo_generate_tokens_per_s",
    "perf/ppo_experience_tokens_per_s", "perf/ppo_train_tokens_per_s",
    "perf/ppo_e2e_tokens_per_s", "perf/ppo_e2e_nonpad_tokens_per_s",
    "mem/peak_host_rss_bytes",
    "time/sft_s", "time/rm_s", "time/ppo_e2e_s", "time/eval_s", "time/setup_s", "time/data_s",
    "time/trial_s",
)  # fmt: skip


def summary(values: list[float]) -> dict[str, float]:
    """Mean, sample sd and coefficient of variation (sd / |mean|) of repeated measurements."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"n": len(values), "mean": mean, "sd": sd, "cv": sd / abs(mean) if mean else 0.0}


def run_trial(code: Path, config: str, seed: int) -> dict[str, float]:
    """One `tunelab trial` process on the code in `code`; its metrics."""
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "PYTHONPATH": str(code)}
        subprocess.run(
            [sys.executable, "-m", "tunelab", "trial", config, "--out", folder, f"seed={seed}"],
            cwd=code, env=env, check=True, capture_output=True,
        )  # fmt: skip
        result = json.loads((Path(folder) / "metrics.json").read_text())
    if result["status"] != "ok":
        status = f"{result['status']} {result['reason']}"
        raise SystemExit(f"trial with seed {seed} in {code}: {status}")
    return result["metrics"]


def _cell(stats: dict | None, scale: float) -> str:
    if stats is None:
        return "— | — | —"
    return f"{stats['mean'] / scale:.4g} | {stats['sd'] / scale:.3g} | {100 * stats['cv']:.1f}%"


def write_report(record: dict, out: Path) -> None:
    before, after = record.get("before"), record["after"]
    lines = [
        "# Run-to-run noise of one trial configuration", "",
        f"`{record['command']}` on {record['date']} ({record['machine']}, "
        f"{record['cpus']} CPUs; load average {record['load_start']:.1f} at the start, "
        f"{record['load_end']:.1f} at the end).", "",
        f"{record['repeats']} runs of `tunelab trial {record['config']}` each, trial seeds "
        f"{FIRST_SEED}..{FIRST_SEED + record['repeats'] - 1} (one per run, the same list for "
        "both columns), each a separate process, before and after interleaved.",
    ]  # fmt: skip
    if before is not None:
        lines += [
            f"*Before*: commit {record['before_commit']} (evaluation on the trial's own RNG "
            "stream and 64 held-out prompts drawn from the trial seed). *After*: this commit "
            "(common random numbers: evaluation's own stream from `eval_seed`, the same 256 "
            "held-out prompts for every trial).",
        ]  # fmt: skip
    lines += ["", "| metric | before mean | sd | CV | after mean | sd | CV |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in METRICS:
        if name not in after and (before is None or name not in before):
            continue
        scale = 2**20 if name.endswith("_bytes") else 1.0
        unit = " (MiB)" if scale != 1.0 else ""
        old = before.get(name) if before else None
        lines.append(f"| `{name}`{unit} | {_cell(old, scale)} | {_cell(after.get(name), scale)} |")
    if before is not None:
        lines += ["", "Gold-reward sd across repeats, after / before:"]
        for name in ("ppo/gold_gain", "ppo/gold_end", "ppo/gold_start"):
            ratio = after[name]["sd"] / before[name]["sd"] if before[name]["sd"] else float("nan")
            lines.append(f"- `{name}`: {after[name]['sd']:.4f} / {before[name]['sd']:.4f} = "
                         f"{ratio:.2f}")  # fmt: skip
    lines += [
        "",
        "Timing and throughput CVs were measured on a shared machine while other work ran (see "
        "the load average above; it has more runnable work than CPUs): they bound the noise "
        "from above, they are not the noise of an idle node. Reward figures do not depend on "
        "load.", "",
    ]  # fmt: skip
    (out / "noise.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="studies/trials/tiny.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", help="a commit to measure too (e.g. 1cd30bc)")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (an sd needs two runs)")
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {"after": [], "before": []}
    with tempfile.TemporaryDirectory() as scratch:
        old_code = None
        if args.before:
            old_code = Path(scratch) / "before"
            subprocess.run(["git", "worktree", "add", "--detach", str(old_code), args.before],
                           cwd=ROOT, check=True, capture_output=True)  # fmt: skip
        try:
            for i in range(args.repeats):
                seed = FIRST_SEED + i
                if old_code is not None:
                    runs["before"].append(run_trial(old_code, args.config, seed))
                runs["after"].append(run_trial(ROOT, args.config, seed))
                print(f"repeat {i + 1}/{args.repeats} done, {time.perf_counter() - started:.0f} s",
                      flush=True)  # fmt: skip
        finally:
            if old_code is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(old_code)],
                               cwd=ROOT, check=False, capture_output=True)  # fmt: skip

    def stats(column: list[dict]) -> dict[str, dict]:
        return {name: summary([run[name] for run in column]) for name in METRICS
                if column and all(name in run for run in column)}  # fmt: skip

    record = {
        **record_header(),
        "cpus": os.cpu_count(),
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "wall_s": time.perf_counter() - started,
        "config": args.config,
        "repeats": args.repeats,
        "seeds": [FIRST_SEED + i for i in range(args.repeats)],
        "before_commit": args.before,
        "after": stats(runs["after"]),
        "before": stats(runs["before"]) if args.before else None,
        "runs": {
            name: [{k: run.get(k) for k in METRICS} for run in column]
            for name, column in runs.items()
        },
    }
    out = ROOT / "reports" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "noise.json").write_text(json.dumps(record, indent=1) + "\n")
    write_report(record, out)
    print((out / "noise.md").read_text())


if __name__ == "__main__":
    main()
