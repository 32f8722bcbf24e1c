"""Fuzz: the property tests' generated inputs (tests/helpers/properties.py) at scale.

    python benchmarks/fuzz.py [--examples 10000] [--seed 0]

Runs each property of tests/test_properties.py with hypothesis over a share of `--examples`
inputs (trial configs, study specs, data files, command lines). Instead of stopping at the
first exception that is not tunelab's own, it counts every outcome and keeps each distinct
non-project exception with the input that raised it. Writes reports/bench/fuzz.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.properties import (  # noqa: E402
    OVERRIDES,
    SMOKE,
    TINY,
    check_cli,
    check_config,
    check_data,
    check_spec,
    command_lines,
    data_files,
    documents,
)
from tests.report_tests.studies import cpu_study  # noqa: E402

SHARES = {"trial config": 0.3, "study spec": 0.3, "data file": 0.15, "command line": 0.25}


def run_property(name: str, examples: int, seed_: int, study_dir: Path) -> dict:
    outcomes: collections.Counter = collections.Counter()
    failures: dict[str, dict] = {}

    def record(check, *args) -> None:
        with tempfile.TemporaryDirectory() as folder:
            try:
                outcomes[check(Path(folder), *args)] += 1
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # what the property forbids: count and keep it
                outcomes["non-project exception"] += 1
                where = traceback.extract_tb(exc.__traceback__)[-1]
                key = f"{type(exc).__name__} at {Path(where.filename).name}:{where.lineno}"
                failures.setdefault(key, {"message": str(exc)[:300], "input": repr(args)[:600],
                                          "count": 0})  # fmt: skip
                failures[key]["count"] += 1

    options = settings(max_examples=examples, deadline=None, database=None,
                       suppress_health_check=list(HealthCheck))  # fmt: skip
    if name == "trial config":

        @given(document=documents(TINY, "config"), overrides=OVERRIDES)
        def prop(document, overrides):
            record(check_config, document, overrides)
    elif name == "study spec":

        @given(spec=documents(SMOKE, "spec"), base=st.none() | documents(TINY, "config"))
        def prop(spec, base):
            record(check_spec, spec, base)
    elif name == "data file":

        @given(document=data_files())
        def prop(document):
            record(check_data, document)
    else:

        @given(data=st.data())
        def prop(data):
            with tempfile.TemporaryDirectory() as folder:
                argv = data.draw(command_lines(Path(folder), study_dir))
                try:
                    outcomes[check_cli(Path(folder), argv)] += 1
                except BaseException as exc:
                    outcomes["non-project exception"] += 1
                    key = f"{type(exc).__name__}: {str(exc)[:120]}"
                    failures.setdefault(
                        key, {"message": str(exc)[:300], "input": repr(argv)[:600], "count": 0}
                    )
                    failures[key]["count"] += 1

    started = time.perf_counter()
    seed(seed_)(options(prop))()
    return {"inputs": sum(outcomes.values()), "outcomes": dict(outcomes), "failures": failures,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="inputs over all properties")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    study_dir = Path(tempfile.mkdtemp(prefix="fuzz-study-"))
    cpu_study("smoke", f"sqlite:///{study_dir / 'study.db'}")
    results = {}
    for name, share in SHARES.items():
        results[name] = run_property(name, round(args.examples * share), args.seed, study_dir)
        print(name, results[name]["inputs"], results[name]["outcomes"], flush=True)
    command = (
        "python benchmarks/fuzz.py"
        + (f" --examples {args.examples}" if args.examples != 10_000 else "")
        + (f" --seed {args.seed}" if args.seed else "")
    )
    total = sum(r["inputs"] for r in results.values())
    bad = sum(r["outcomes"].get("non-project exception", 0) for r in results.values())
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = f"{platform.node()} {platform.machine()}"
    out = ROOT / "reports" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.json").write_text(json.dumps(
        {"command": command, "when": when, "machine": machine, "inputs": total,
         "non_project_exceptions": bad, "properties": results}, indent=1))  # fmt: skip
    labels = ["valid", "ok", "InputError", "launched", "help", "non-project exception"]
    lines = [
        "# Fuzz: generated bad input through the loaders and the CLI", "",
        f"`{command}` on {when} ({machine}); hypothesis, seed {args.seed}.", "",
        f"**{total:,} inputs, {bad} non-project exceptions.**", "",
        "| property | inputs | " + " | ".join(labels) + " | seconds |",
        "|---|---|" + "---|" * len(labels) + "---|",
    ]  # fmt: skip
    for name, result in results.items():
        counts = " | ".join(str(result["outcomes"].get(label, 0)) for label in labels)
        lines.append(f"| {name} | {result['inputs']:,} | {counts} | {result['seconds']} |")
    lines += [
        "",
        "valid/ok: a TrialConfig, a spec that runs (sampler, pruner, baselines, sampled points), "
        "a data file, or exit code 0; InputError: tunelab's own error (exit code 2 and a "
        "`tunelab: error:` line from the CLI); launched: the command reached the point where "
        "it starts a trial or a study (patched out); help: `--help`. Inputs are the shipped "
        "tiny trial config and smoke spec with keys set to odd values, deleted or added, the "
        "text edited, re-encoded as Latin-1 or replaced by bytes (tests/helpers/properties.py).",
    ]
    for name, result in results.items():
        for key, failure in result["failures"].items():
            lines += ["", f"- {name}: {key} ×{failure['count']}: {failure['message']}",
                      f"  input: `{failure['input']}`"]  # fmt: skip
    (out / "fuzz.md").write_text("\n".join(lines) + "\n")
    print(f"{total} inputs, {bad} non-project exceptions -> {out / 'fuzz.md'}")


if __name__ == "__main__":
    main()
