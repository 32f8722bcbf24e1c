"""Study storage: Optuna RDB URLs (SQLite, PostgreSQL, MySQL/MariaDB) or a journal file, and a
cross-process lock that makes the trial budget exact when several workers share a study.

optuna-dashboard reads the same URL or journal file as it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage

from tunelab.errors import InputError

# Heartbeats and their retry callback are marked experimental in Optuna 5; they are its
# documented way to recover from dead workers.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

HEARTBEAT_S = 20  # a worker that stops beating for GRACE_S is taken as dead
GRACE_S = 120
MAX_RETRY = 2  # times an interrupted trial's parameters are run again

_JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")


def default_url(out_dir: Path) -> str:
    """An embedded SQLite file in the study's folder (one writer process: no locking trouble)."""
    return f"sqlite:///{(out_dir / 'study.db').resolve()}"


def _journal_path(url: str) -> Path | None:
    if url.startswith("journal:///"):
        return Path(url[len("journal://") :])
    if "://" not in url and url.endswith(_JOURNAL_SUFFIXES):
        return Path(url).resolve()
    return None


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open an Optuna storage; RDB storages get heartbeats, so a dead worker's trial is failed
    and its parameters enqueued again (Optuna's RetryHeartbeatStaleTrialCallback)."""
    journal = _journal_path(url)
    try:
        if journal is not None:
            journal.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(journal)))
        if "://" not in url:
            raise InputError(
                f"storage {url!r}: expected an RDB URL (sqlite:///…, postgresql://…, "
                f"mysql+pymysql://…) or a journal file (*.log, journal:///path)"
            )
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        return RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
        )
    except InputError:
        raise
    except Exception as exc:  # sqlalchemy and drivers raise many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"storage {url!r}: cannot open ({first})") from None


_THREAD_LOCKS: dict[str, threading.Lock] = {}


@contextlib.contextmanager
def budget_lock(url: str, study_name: str) -> Iterator[None]:
    """Mutual exclusion for "count the trials, then ask for one" across threads, processes and
    hosts: a PostgreSQL advisory lock, a MySQL named lock, or an flock next to a SQLite or
    journal file (one host)."""
    key = f"tunelab:{study_name}"
    thread_lock = _THREAD_LOCKS.setdefault(f"{url}|{key}", threading.Lock())
    with thread_lock:
        if url.startswith(("postgresql", "mysql")):
            import sqlalchemy

            engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            with engine.connect() as connection:
                if url.startswith("postgresql"):
                    lock_id = zlib.crc32(key.encode())
                    connection.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({lock_id})"))
                    unlock = f"SELECT pg_advisory_unlock({lock_id})"
                else:
                    connection.execute(sqlalchemy.text("SELECT GET_LOCK(:k, 600)"), {"k": key})
                    unlock = None
                try:
                    yield
                finally:
                    if unlock:
                        connection.execute(sqlalchemy.text(unlock))
                    else:
                        connection.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": key})
            engine.dispose()
            return
        target = _journal_path(url) or Path(url[len("sqlite:///") :])
        lock_path = target.with_name(target.name + ".tunelab.lock")
        with lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def load_study(folder: Path | None = None, url: str | None = None, name: str | None = None):
    """A study by its folder (holding study.db) or by storage URL, and name (optional when the
    storage holds one study). One-line errors for anything missing."""
    if url is None:
        if folder is None:
            raise InputError("give a study folder, or --storage URL and --study NAME")
        if not (folder / "study.db").is_file():
            raise InputError(f"{folder}: no study.db here (is it a study folder?)")
        url = default_url(folder)
    storage = open_storage(url)
    names = optuna.get_all_study_names(storage)
    if name is None:
        if len(names) != 1:
            listed = ", ".join(names) or "none"
            raise InputError(f"storage {url}: holds {len(names)} studies ({listed}); name one")
        name = names[0]
    if name not in names:
        raise InputError(f"storage {url}: no study named {name!r}")
    return optuna.load_study(study_name=name, storage=storage)
