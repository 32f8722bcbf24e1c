"""Where a benchmark ran: the commit of the checkout it measures, and its record's header."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path


def short_commit(tree: Path) -> str:
    """The commit checked out at `tree`, as git's short hash."""
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip


def record_header(command: str | None = None) -> dict:
    """A benchmark record's command (by default this script's command line), UTC date and
    machine."""
    if command is None:
        command = " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    return {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}",
    }
