"""Multi-fidelity for a reward study: what Optuna's pruners, reading PPO's running reward,
would keep and save, replayed against measured runs of studies/ppo-coefficients.yaml.

    python benchmarks/reward_pruning.py measure [--trials 16] [--seeds 0 1]  # ~6 min a seed
    python benchmarks/reward_pruning.py replay

`measure` runs the shipped spec without its early stops (no pruner, no constraint stop
margin; stage reuse and its baseline kept) and without confirmation runs, once per sampler
seed, and keeps each finished trial's gold gain, constrained metrics,
knobs and per-step series (gold reward, reward-model score, KL, step seconds) in
benchmarks/ppo_series.json. `replay` feeds each run's trials, in the order they ran, through
an Optuna study per pruner: at every PPO step the mean of the last few steps, as a
live trial reports it (metrics.PROGRESS_METRICS); then alone and with one pruner, the
constraints' stop lines at a few stop margins, checked before the pruner as a live
trial's TrialPruning does (pruning.past_constraint). It records the PPO steps and seconds each
pruner would have run, how many trials finish (Optuna's step numbers start at 0: min_resource
10 judges a trial after its 11th step), and the best gold gain among finished trials
that keep the spec's constraints, against the run's best. Replayed, not live: a live TPE
study proposes differently once trials are pruned. Writes reports/bench/reward_pruning.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pandas
import yaml
from checkout import record_header

from tunelab.metrics import RUNNING, recent_mean
from tunelab.pruning import past_constraint
from tunelab.spec import Constraint

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "studies" / "ppo-coefficients.yaml"
MEASURED = ROOT / "benchmarks" / "ppo_series.json"
STUDY_NAME = yaml.safe_load(SPEC.read_text())["name"]
SERIES = ("ppo/gold", "ppo/score", "ppo/kl", "time/ppo_step_s")
PRUNERS = {
    "successive halving, min_resource 5, reduction_factor 3":
        lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=5, reduction_factor=3),
    "successive halving, min_resource 10, reduction_factor 2":
        lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=10, reduction_factor=2),
    "successive halving, min_resource 20, reduction_factor 2":
        lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=20, reduction_factor=2),
    "Hyperband, min_resource 5, max_resource 40, reduction_factor 3":
        lambda: optuna.pruners.HyperbandPruner(min_resource=5, max_resource=40,
                                               reduction_factor=3),
    "median, n_startup_trials 4, n_warmup_steps 10":
        lambda: optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=10),
}  # fmt: skip
# Constraint stop lines (spec Constraint.stop_margin), alone and with the pruner that kept the
# constrained best in every run.
STOP_MARGINS = (0.1, 0.25)
WITH_STOP_MARGINS = (
    ("none", optuna.pruners.NopPruner, "ppo/score"),
    ("successive halving, min_resource 20, reduction_factor 2",
     PRUNERS["successive halving, min_resource 20, reduction_factor 2"], "ppo/score"),
)  # fmt: skip


def without_stop_margins(constraints: list[dict]) -> list[dict]:
    """The spec's constraints as bounds only: measured runs stop no trial early."""
    return [{k: v for k, v in c.items() if k != "stop_margin"} for c in constraints]


def measure_run(spec: dict, trials: int, seed: int) -> list[dict]:
    """One unpruned run of `spec` with sampler seed `seed`: its finished trials."""
    spec = {**spec, "budget": {"trials": trials}, "confirm": {"top_k": 0}, "pruner": {},
            "constraints": without_stop_margins(spec["constraints"]),
            "sampler": {**spec["sampler"], "seed": seed},
            "base": str(SPEC.parent / spec["base"])}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        subprocess.run([sys.executable, "-m", "tunelab", "run", str(path), "--out",
                        f"{tmp}/out"], cwd=ROOT, check=True)  # fmt: skip
        files = sorted(Path(tmp).glob("out/trials/*/metrics.json"))
        runs = [json.loads(metrics_file.read_text()) for metrics_file in files]
    return [
        {"params": _params(run, spec),
         "gold_gain": run["metrics"]["ppo/gold_gain"],
         "constrained": {c["metric"]: run["metrics"][c["metric"]] for c in spec["constraints"]},
         "series": {name: run["series"][name] for name in SERIES}}
        for run in runs if run["status"] == "ok"
    ]  # fmt: skip


def measure(trials: int, seeds: list[int]) -> None:
    spec = yaml.safe_load(SPEC.read_text())
    record = {**record_header("python benchmarks/reward_pruning.py measure --trials "
                         f"{trials} --seeds {' '.join(map(str, seeds))}"),
              "constraints": without_stop_margins(spec["constraints"]),
              "runs": {str(seed): measure_run(spec, trials, seed) for seed in seeds}}  # fmt: skip
    MEASURED.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{len(seeds)} runs -> {MEASURED}")


def _params(run: dict, spec: dict) -> dict:
    """The trial's value of each knob of the spec's space, from its full config."""
    values = {}
    for dotted in spec["space"]:
        node = run["config"]
        for key in dotted.split("."):
            node = node[key]
        values[dotted] = node
    return values


def reported(values: list[float]) -> list[float]:
    """What a live trial reports at each step of a per-step series (metrics.recent_mean)."""
    return [recent_mean(values[: step + 1]) for step in range(len(values))]


def feasible(trial: dict, constraints: list[dict]) -> bool:
    return all(trial["constrained"][c["metric"]] <= c["max"] for c in constraints)


def replay(trials: list[dict], constraints: list[dict], pruner: optuna.pruners.BasePruner,
           metric: str, stop_margin: float | None = None) -> dict:  # fmt: skip
    """Trials through an Optuna study with `pruner` on `metric` (a series name) and, with a
    `stop_margin`, the constraints' stop lines checked first, as a live trial's TrialPruning
    does. The study is named as the spec's live one: Hyperband puts trials in brackets by a
    hash of that name."""
    study = optuna.create_study(study_name=STUDY_NAME, direction="maximize", pruner=pruner)
    stops = [] if stop_margin is None else [Constraint(**c, stop_margin=stop_margin)
                                            for c in constraints]  # fmt: skip
    steps, seconds = 0, 0.0
    finished, stopped_feasible = [], 0  # stopped by a stop line, yet within every constraint
    for trial in trials:
        asked = study.ask()
        # The running values a stop line reads that have a per-step series here (not the
        # memory peaks so far, which the measured runs did not keep).
        running = {name: reported(trial["series"][name.removesuffix("_recent")])
                   for name in RUNNING.values() if name.endswith("_recent")}  # fmt: skip
        for step, value in enumerate(reported(trial["series"][metric])):
            steps += 1
            seconds += trial["series"]["time/ppo_step_s"][step]
            record = {name: values[step] for name, values in running.items()}
            stopped = past_constraint(record, stops) is not None
            if not stopped:
                asked.report(value, step)
            if stopped or asked.should_prune():
                study.tell(asked, state=optuna.trial.TrialState.PRUNED)
                stopped_feasible += stopped and feasible(trial, constraints)
                break
        else:
            study.tell(asked, trial["gold_gain"])
            finished.append(trial)
    best = [t["gold_gain"] for t in finished if feasible(t, constraints)]
    return {"steps": steps, "ppo_seconds": seconds, "finished": len(finished),
            "stopped_within_constraints": stopped_feasible,
            "best_feasible_gold_gain": max(best) if best else None,
            "best_gold_gain": max(t["gold_gain"] for t in finished)}  # fmt: skip


def summary(trials: list[dict], constraints: list[dict]) -> dict:
    """One unpruned run: its size, best gold gains, and how the gain ranks with each
    constrained metric (Optuna's pruners see the reward, not the constraints)."""
    ranks = pandas.DataFrame([(t["gold_gain"], *t["constrained"].values()) for t in trials]).rank()
    correlation = {c["metric"]: float(ranks[0].corr(ranks[i + 1]))
                   for i, c in enumerate(constraints)}  # fmt: skip
    return {
        "trials": len(trials),
        "steps": sum(len(t["series"]["ppo/gold"]) for t in trials),
        "ppo_seconds": sum(sum(t["series"]["time/ppo_step_s"]) for t in trials),
        "best_gold_gain": max(t["gold_gain"] for t in trials),
        "best_feasible_gold_gain": max(
            (t["gold_gain"] for t in trials if feasible(t, constraints)), default=None
        ),
        "gold_gain_rank_correlation": correlation,
    }


def _gain(value: float | None) -> str:
    return "none finished" if value is None else f"{value:.3f}"


def replay_all() -> None:
    measured = json.loads(MEASURED.read_text())
    constraints = measured["constraints"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = {}
    for seed, trials in measured["runs"].items():
        rows = [{"pruner": name, "metric": f"{metric}_recent", "stop_margin": None,
                 **replay(trials, constraints, make(), metric)}
                for name, make in PRUNERS.items()
                for metric in ("ppo/gold", "ppo/score")]  # fmt: skip
        rows += [{"pruner": name, "metric": f"{metric}_recent" if name != "none" else "",
                  "stop_margin": margin,
                  **replay(trials, constraints, make(), metric, margin)}
                 for margin in STOP_MARGINS
                 for name, make, metric in WITH_STOP_MARGINS]  # fmt: skip
        runs[seed] = {**summary(trials, constraints), "rows": rows}
    record = {"command": "python benchmarks/reward_pruning.py replay",
              "measured": {k: measured[k] for k in ("command", "date", "machine")},
              "constraints": constraints, "runs": runs}  # fmt: skip
    out = ROOT / "reports" / "bench"
    (out / "reward_pruning.json").write_text(json.dumps(record, indent=1) + "\n")
    limits = ", ".join(f"{c['metric']} <= {c['max']}" for c in constraints)
    lines = ["# Pruning a reward study on PPO's running reward (replayed)", "",
             f"`{record['command']}` over `{measured['command']}` ({measured['date']}, "
             f"{measured['machine']}): studies/ppo-coefficients.yaml, one unpruned run per "
             f"sampler seed; the constraint: {limits}.", ""]  # fmt: skip
    for seed, run in runs.items():
        correlation = ", ".join(
            f"{metric} {r:.2f}" for metric, r in run["gold_gain_rank_correlation"].items()
        )
        lines += [f"## Sampler seed {seed}", "",
                  f"{run['trials']} trials, {run['steps']} PPO steps, {run['ppo_seconds']:.0f} s "
                  f"of PPO steps. Unpruned: best gold gain {run['best_gold_gain']:.3f}, best "
                  f"keeping the constraint {_gain(run['best_feasible_gold_gain'])}. Rank "
                  f"correlation of the gold gain with {correlation}.", "",
                  "| pruner | reads | constraint stop_margin | PPO steps run | PPO seconds run "
                  "| trials finished | stopped by the stop line, yet within the constraint "
                  "| best gold gain | best gold gain keeping the constraint |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in run["rows"]:
            margin = "" if row["stop_margin"] is None else f"{row['stop_margin']:g}"
            lines.append(f"| {row['pruner']} | {row['metric']} | {margin} | "
                         f"{row['steps'] / run['steps']:.0%} | "
                         f"{row['ppo_seconds'] / run['ppo_seconds']:.0%} | {row['finished']} | "
                         f"{margin and row['stopped_within_constraints']} | "
                         f"{row['best_gold_gain']:.3f} | "
                         f"{_gain(row['best_feasible_gold_gain'])} |")  # fmt: skip
        lines.append("")
    (out / "reward_pruning.md").write_text("\n".join(lines))
    print((out / "reward_pruning.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["measure", "replay"])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    if args.command == "measure":
        measure(args.trials, args.seeds)
    else:
        replay_all()


if __name__ == "__main__":
    main()
