"""How often a rank aborts at exit through the interpreter's finalization, against
tunelab.pipeline.process_end.end_process.

    python benchmarks/process_end.py --runs 10

Runs tests/helpers/held_group_exit.py on 2 gloo ranks (asynchronous collectives finishing on a
group that outlives destroy_process_group, as DeepSpeed keeps one), the two ways taking turns.
A run counts as aborted when a rank printed "terminate called without an active exception", the
message of CI's failures. Writes reports/bench/process_end.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from checkout import record_header, short_commit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.ranks import launch_on_ranks  # noqa: E402

HELPER = ROOT / "tests" / "helpers" / "held_group_exit.py"
ABORT = "terminate called without an active exception"
WAYS = ("interpreter", "end_process")


def one_run(how: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        run = launch_on_ranks(HELPER, how, out, timeout=300)
        written = sorted(p.name for p in Path(out).iterdir())
    return {"how": how, "returncode": run.returncode, "aborted": ABORT in run.stdout + run.stderr,
            "both_written": written == ["rank0.txt", "rank1.txt"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10, help="runs each way")
    args = parser.parse_args()
    runs = []
    for _ in range(args.runs):
        for how in WAYS:
            runs.append(one_run(how))
            print(runs[-1], file=sys.stderr)
    record = {
        **record_header(f"python benchmarks/process_end.py --runs {args.runs}"),
        "commit": short_commit(ROOT),
        "runs": runs,
    }
    out = ROOT / "reports" / "bench"
    (out / "process_end.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["# How a rank ends: the interpreter's finalization against end_process", "",
             f"`{record['command']}` on {record['date']} ({record['machine']}, commit "
             f"{record['commit']}); tests/helpers/held_group_exit.py on 2 gloo ranks, the two "
             "ways taking turns.", "",
             "| way | runs | aborted (SIGABRT, \"terminate called without an active "
             "exception\") | exit 0 | both ranks' results written |",
             "|---|---|---|---|---|"]  # fmt: skip
    for how in WAYS:
        mine = [r for r in runs if r["how"] == how]
        lines.append(f"| {how} | {len(mine)} | {sum(r['aborted'] for r in mine)} | "
                     f"{sum(r['returncode'] == 0 for r in mine)} | "
                     f"{sum(r['both_written'] for r in mine)} |")  # fmt: skip
    lines.append("")
    (out / "process_end.md").write_text("\n".join(lines))
    print((out / "process_end.md").read_text())


if __name__ == "__main__":
    main()
