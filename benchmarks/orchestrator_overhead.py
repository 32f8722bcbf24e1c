"""Orchestrator overhead per trial: wall time of a study outside its trial processes.

    python benchmarks/orchestrator_overhead.py [--trials 6] [--storage sqlite|postgres|both]

Runs a real study of fast tiny trials (real subprocesses) with tunelab's Orchestrator and
subtracts each trial process's own wall time (measured by the launcher from process start to
exit, imports included) from the study's wall time. What remains is tunelab's cost per trial:
asking Optuna under the budget lock, sampling, config checks, the memory prediction, starting
the process, noticing its exit, reading its files and telling Optuna. Writes
reports/bench/orchestrator_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tunelab.spec import load_spec  # noqa: E402
from tunelab.storage import default_url  # noqa: E402
from tunelab.study import Orchestrator, create_or_resume  # noqa: E402

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
FAST = {"sft.steps": 4, "rm.steps": 4, "ppo.steps": 4, "warmup_steps": 1,
        "data.train_size": 256, "data.eval_size": 16}  # fmt: skip


def measure(storage: str, trials: int, folder: Path) -> dict:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    (folder / "trials").mkdir(parents=True, exist_ok=True)
    (folder / "trials" / "tiny.yaml").write_text((ROOT / "studies/trials/tiny.yaml").read_text())
    spec = {"name": name, "base": "trials/tiny.yaml", "base_overrides": FAST,
            "objectives": [{"metric": "perf/ppo_e2e_tokens_per_s", "direction": "maximize"}],
            "space": {"ppo.kl_coef": {"low": 0.05, "high": 0.2}},
            "sampler": {"type": "tpe", "seed": 0}, "budget": {"trials": trials}}  # fmt: skip
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    url = default_url(folder) if storage == "sqlite" else POSTGRES
    loaded = load_spec(path)
    study = create_or_resume(loaded, url)
    started = time.perf_counter()
    Orchestrator(loaded, study, url, folder, echo=lambda line: None).run()
    total = time.perf_counter() - started
    walls = [t.user_attrs["wall_s"] for t in study.trials]
    if storage == "postgres":
        optuna.delete_study(study_name=name, storage=POSTGRES)
    per_trial = [(total - sum(walls)) / len(walls)]
    return {
        "storage": storage, "trials": len(walls), "study_wall_s": total,
        "trial_process_wall_s": sum(walls), "trial_wall_median_s": statistics.median(walls),
        "overhead_per_trial_s": per_trial[0],
        "overhead_fraction": (total - sum(walls)) / total,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--storage", choices=("sqlite", "postgres", "both"), default="both")
    args = parser.parse_args()
    storages = ["sqlite", "postgres"] if args.storage == "both" else [args.storage]
    results = []
    for storage in storages:
        with tempfile.TemporaryDirectory() as folder:
            results.append(measure(storage, args.trials, Path(folder)))
    command = "python benchmarks/orchestrator_overhead.py " + " ".join(sys.argv[1:])
    record = {
        "command": command.strip(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {platform.processor() or 'cpu'}",
        "results": results,
    }
    out = ROOT / "reports" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "orchestrator_overhead.json").write_text(json.dumps(record, indent=1) + "\n")
    rows = [
        f"| {r['storage']} | {r['trials']} | {r['study_wall_s']:.1f} | "
        f"{r['trial_process_wall_s']:.1f} | {r['overhead_per_trial_s'] * 1000:.0f} ms | "
        f"{r['overhead_fraction']:.1%} |"
        for r in results
    ]
    (out / "orchestrator_overhead.md").write_text("\n".join([
        "# Orchestrator overhead per trial", "",
        f"`{record['command']}` on {record['date']} ({record['machine']}).", "",
        "| storage | trials | study wall (s) | trial processes (s) | overhead per trial | share |",
        "|---|---|---|---|---|---|", *rows, "",
        "Overhead = study wall time minus the trial processes' own wall time (process start to "
        "exit, imports included), divided by the number of trials.", "",
    ]))  # fmt: skip
    print((out / "orchestrator_overhead.md").read_text())


if __name__ == "__main__":
    main()
