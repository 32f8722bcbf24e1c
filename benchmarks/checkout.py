"""The checkout a side-by-side benchmark measures, named by its commit."""

from __future__ import annotations

import subprocess
from pathlib import Path


def short_commit(tree: Path) -> str:
    """The commit checked out at `tree`, as git's short hash."""
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
