"""Run a helper script on several gloo ranks through torchrun, from a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tunelab.launcher import TRIAL_ENV

# In-process trials of a pytest run set the rank variables; a helper must start clean.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch_on_ranks(script: Path, *args: str, ranks: int = 2,
                    timeout: float = 600) -> subprocess.CompletedProcess:  # fmt: skip
    """`torchrun --nproc_per_node ranks script args...`, as the launcher starts a trial."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(ranks), str(script), *args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env.update(TRIAL_ENV)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def run_on_ranks(script: Path, *args: str, ranks: int = 2, timeout: float = 600) -> None:
    """launch_on_ranks; fails the test with the output tail unless every rank exited 0."""
    run = launch_on_ranks(script, *args, ranks=ranks, timeout=timeout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
