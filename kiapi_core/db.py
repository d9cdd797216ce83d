"""The embedded store's SQLite database: a file under KIAPI_HOME, WAL, a connection per thread.

The database and its WAL/SHM files are private to the user (0600; SQLite gives the WAL and SHM
the database file's mode). Next to it lies a reserve file (``KIAPI_DISK_RESERVE_BYTES``): when
the disk is full, an essential write (a job's end, a file's deletion) releases it and tries
again, so those still get recorded; the server re-creates it once there is room.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from kiapi_core.diskfull import is_disk_full

log = logging.getLogger("kiapi.db")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    result TEXT,
    artifacts TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    progress REAL,
    progress_label TEXT NOT NULL DEFAULT 'queued',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error_kind TEXT,
    worker TEXT,
    -- Bumped on every change, so followers can order snapshots and skip stale ones.
    version INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_type_seq ON jobs (type, seq);
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    content_type TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    job_id TEXT
);
CREATE INDEX IF NOT EXISTS files_job ON files (job_id);
CREATE INDEX IF NOT EXISTS files_created ON files (created_at);
"""

# Columns added after the first release of the schema: (table, column, definition).
MIGRATIONS = [("jobs", "version", "INTEGER NOT NULL DEFAULT 0")]


def _migrate(conn: sqlite3.Connection) -> None:
    for table, column, definition in MIGRATIONS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


class Database:
    """Hands each thread its own connection (sqlite3 objects must not cross threads)."""

    def __init__(self, path: Path, *, reserve_bytes: int = 0) -> None:
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Private before SQLite opens it (an older release left it 0644): the WAL and SHM
        # files SQLite creates next to it take its mode.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        self.reserve_path = path.with_name(path.name + ".reserve")
        self.reserve_bytes = reserve_bytes
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self.connect()
        conn.executescript(SCHEMA)
        _migrate(conn)
        self.ensure_reserve()

    def connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE) where they matter.
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across process crashes in WAL mode (only power loss can drop
            # the last commits), and much cheaper than FULL for frequent progress updates.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self.connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (SQLITE_FULL) may or may not have rolled back already; a
            # transaction left open would make every later BEGIN on this thread fail.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def write(self, fn: Callable[[sqlite3.Connection], T], *, essential: bool = False) -> T:
        """``fn`` in a transaction. ``essential``: on a full disk, release the reserve, retry."""
        try:
            with self.transaction() as conn:
                return fn(conn)
        except sqlite3.Error as exc:
            if not (essential and is_disk_full(exc) and self.release_reserve()):
                raise
        with self.transaction() as conn:
            return fn(conn)

    # -- the disk space reserve ------------------------------------------------------------
    def ensure_reserve(self) -> None:
        """Create (or complete) the reserve file if it is missing and the disk has room."""
        if self.reserve_bytes <= 0:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                if self.reserve_path.stat().st_size >= self.reserve_bytes:
                    return
            # Never take the last of the space: that is what the reserve is for.
            if shutil.disk_usage(self.path.parent).free < 2 * self.reserve_bytes:
                return
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                # Real blocks (not a sparse file), or releasing it would free nothing.
                os.posix_fallocate(fd, 0, self.reserve_bytes)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("could not set aside the disk reserve (%s)", exc.strerror or exc)

    def release_reserve(self) -> bool:
        """Free the reserve for an essential write; False if there was none."""
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        except OSError:
            log.exception("could not release the disk reserve")
            return False
        log.warning(
            "disk full: released the %d-byte reserve to record a job's end or a deletion;"
            " free space on the disk of KIAPI_HOME",
            self.reserve_bytes,
        )
        return True

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()
        self._local = threading.local()
