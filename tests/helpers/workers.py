"""Start `tunelab worker` processes on one study and wait for them all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_workers(storage: str, study: str, folder: Path, count: int = 3, timeout: float = 600):
    """`count` worker processes at once; asserts each exits 0 (its stderr tail otherwise)."""
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tunelab", "worker", "--storage", storage, "--study", study,
             "--out", str(folder / f"node{i}")],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for i in range(count)
    ]  # fmt: skip
    for worker in workers:
        _, err = worker.communicate(timeout=timeout)
        assert worker.returncode == 0, err[-3000:]
