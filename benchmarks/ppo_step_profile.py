"""Where a PPO step's time goes: a sampling profile of the trial process, by phase.

    pip install py-spy   # not a tunelab dependency
    python benchmarks/ppo_step_profile.py [--zero 2] [--steps 200] [--rate 100]

Runs ppo_step.py's trial (tiny OPT-shaped preset, bf16, optimizer offload, batch 4, 32 + 32
tokens) under `py-spy record --subprocesses -f raw` and splits the samples taken inside PPO's
generation and training by the frame they were in (self time, code line stripped). Sampling
slows the trial down, so the shares, not the seconds, are the result. Also times one linear layer
of the model's width ([4, 64] x [64, 64], a decoding step's shape) in bf16 and fp32 (LINEAR_CALLS
calls each, one thread): on a CPU without bf16 matmul units, bf16 costs a fixed time per call.
Writes reports/bench/ppo_step_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from ppo_step import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
# A sample belongs to a phase when one of its frames is that function (py-spy's raw format:
# "frame;frame;... count", each frame "function (file:line)").
PHASES = {"generate": "PPOTrainer.generate (", "train": "PPOTrainer.train ("}
TOP = 12
LINEAR_CALLS = 2000
LINEAR_TIMER = """
import json, time, torch
torch.set_num_threads(1)
seconds = {}
for dtype in (torch.bfloat16, torch.float32):
    x, w = torch.randn(4, 64, dtype=dtype), torch.randn(64, 64, dtype=dtype)
    for _ in range(100):
        torch.nn.functional.linear(x, w)
    started = time.perf_counter()
    for _ in range(CALLS):
        torch.nn.functional.linear(x, w)
    seconds[str(dtype).split(".")[1]] = (time.perf_counter() - started) / CALLS
print(json.dumps(seconds))
"""


def package(frame: str) -> str:
    """'Linear.forward (torch/nn/modules/linear.py:134)' -> 'torch' (py-spy gives paths below
    site-packages, or the checkout's for tunelab); the standard library's -> 'python'."""
    where = frame.partition(" (")[2]
    return where.split("/", 1)[0] if "/" in where else "python"


def frame_name(frame: str) -> str:
    """'Linear.forward (torch/nn/modules/linear.py:134)' -> 'Linear.forward (torch/linear.py)'."""
    function, _, where = frame.partition(" (")
    return f"{function} ({package(frame)}/{where.rsplit('/', 1)[-1].split(':')[0]})"


def self_time(raw: str, phase_frame: str) -> tuple[int, Counter, Counter]:
    """Samples inside the phase, and their counts by innermost frame and by its package."""
    frames_found: Counter = Counter()
    packages: Counter = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if any(phase_frame in frame for frame in frames):
            frames_found[frame_name(frames[-1])] += int(count)
            packages[package(frames[-1])] += int(count)
    return sum(packages.values()), frames_found, packages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    args = parser.parse_args()
    settings = [s for s in SETTINGS if not s.startswith("ppo.steps=")]
    with tempfile.TemporaryDirectory() as folder:
        raw_path = Path(folder) / "profile.txt"
        subprocess.run(
            ["py-spy", "record", "--subprocesses", "-r", str(args.rate), "-f", "raw", "-o",
             str(raw_path), "--", sys.executable, "-m", "tunelab", "trial",
             "studies/trials/tiny.yaml", "--out", str(Path(folder) / "trial"), *settings,
             f"ppo.steps={args.steps + 1}", f"actor.zero_stage={args.zero}",
             f"critic.zero_stage={args.zero}"],
            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True,
            capture_output=True,
        )  # fmt: skip
        raw = raw_path.read_text()
    linear_s = json.loads(subprocess.run(
        [sys.executable, "-c", f"CALLS = {LINEAR_CALLS}" + LINEAR_TIMER], check=True,
        capture_output=True, text=True).stdout)  # fmt: skip
    phases = {}
    for phase, phase_frame in PHASES.items():
        total, frames_found, packages = self_time(raw, phase_frame)
        phases[phase] = {
            "samples": total,
            "packages": {name: n / total for name, n in packages.most_common()},
            "top": [[name, n / total] for name, n in frames_found.most_common(TOP)],
        }
    record = {
        "command": "python benchmarks/ppo_step_profile.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "zero": args.zero,
        "phases": phases,
        "linear_call_s": linear_s,
    }
    out = ROOT / "reports" / "bench"
    (out / "ppo_step_profile.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["# Where a PPO step's time goes", "",
             f"`{record['command'].strip()}` on {record['date']}: ZeRO-{args.zero}, the trial of "
             "benchmarks/ppo_step.py under py-spy; share of each phase's samples by the frame "
             "they were in (self time).", "",
             f"One `F.linear` call of [4, 64] x [64, 64], mean of {LINEAR_CALLS}: bf16 "
             f"{linear_s['bfloat16'] * 1e6:.1f} us, fp32 {linear_s['float32'] * 1e6:.1f} us.",
             ""]  # fmt: skip
    for phase, found in phases.items():
        shares = ", ".join(f"{name} {share:.0%}" for name, share in found["packages"].items())
        lines += [f"## {phase} ({found['samples']} samples)", "", f"By package: {shares}.", "",
                  "| frame | share |", "|---|---|",
                  *(f"| `{n}` | {share:.1%} |" for n, share in found["top"]), ""]  # fmt: skip
    (out / "ppo_step_profile.md").write_text("\n".join(lines))
    print((out / "ppo_step_profile.md").read_text())


if __name__ == "__main__":
    main()
