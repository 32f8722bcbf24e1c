"""Files that several processes read while one writes: never seen half-written."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path


def private_name(path: Path, what: str) -> Path:
    """A sibling of `path` no other process or thread writes."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{what}")


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`: a concurrent reader sees the old file or the new one."""
    draft = private_name(path, "draft")
    draft.write_text(text)
    draft.replace(path)


def write_once(path: Path, text: str) -> str | None:
    """Write `text` to `path` unless it exists: None when this call wrote it, else what the
    file holds ("" when it was removed meanwhile). The text goes to a draft that is linked
    into place (a link, unlike a rename, fails when the file exists), so it is never seen
    empty."""
    draft = private_name(path, "draft")
    draft.write_text(text)
    try:
        os.link(draft, path)
        return None
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            return path.read_text()
        return ""
    finally:
        draft.unlink(missing_ok=True)
