"""The embedded store's SQLite database: a file under KIAPI_HOME, WAL, a connection per thread.

The event loop never waits for a database lock. Its own connection has no busy timeout: a call
that finds the database locked (another process in a long write transaction) is re-run on a
small pool of threads that wait at most ``wait_s`` (KIAPI_STORE_BUSY_TIMEOUT_S), and past that
the request is answered 503 with ``Retry-After`` (``StoreBusy``). Other threads (workers) wait
``busy_timeout_s``.

The database and its WAL/SHM files are private to the user (0600; SQLite gives the WAL and SHM
the database file's mode). Next to it lies a reserve file (``KIAPI_DISK_RESERVE_BYTES``): when
the disk is full, an essential write (a job's end, a file's deletion) releases it and tries
again, so those still get recorded; the server re-creates it once there is room.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

from kiapi_core.state.diskfull import is_disk_full

log = logging.getLogger("kiapi.db")
P = ParamSpec("P")
T = TypeVar("T")
_WAITER_PREFIX = "kiapi-store-wait"

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
    version INTEGER NOT NULL DEFAULT 0,
    -- The HTTP status a handler failed its job with (JobFailed), for every later answer.
    error_status INTEGER,
    -- The media type of the one file the job must save (respond_with_job's media_type).
    artifact_type TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    deadline REAL,
    retry_of TEXT,
    retried_by TEXT,
    -- A running job's expected end (Unix time), from its handler or the host's estimate.
    eta_at REAL,
    keep_alive_s REAL
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
MIGRATIONS = [
    ("jobs", "version", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "error_status", "INTEGER"),
    ("jobs", "artifact_type", "TEXT"),
    ("jobs", "priority", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "deadline", "REAL"),
    ("jobs", "retry_of", "TEXT"),
    ("jobs", "retried_by", "TEXT"),
    # The job's webhook (JSON: url, events, progress_ms) and when it last sent progress.
    ("jobs", "webhook", "TEXT"),
    ("jobs", "webhook_progress_at", "REAL"),
    ("jobs", "eta_at", "REAL"),
    ("jobs", "keep_alive_s", "REAL"),
]

# What needs the migrated columns: run after MIGRATIONS.
AFTER_MIGRATIONS = """
-- Claim order: priority first, then FIFO.
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (status, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_deadline ON jobs (deadline)
    WHERE status = 'queued' AND deadline IS NOT NULL;
-- Recent run times of a type (ETA, Retry-After) without a walk past its queued jobs.
CREATE INDEX IF NOT EXISTS jobs_done_type ON jobs (type, seq) WHERE status = 'succeeded';
-- Retention (KIAPI_JOBS_TTL_S): the oldest finished jobs first, without a walk past the rest.
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at)
    WHERE status IN ('succeeded', 'failed', 'canceled');
-- Idempotency-Key -> the job it created, until expires_at.
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    job_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency (expires_at);
-- The webhook outbox (kiapi_core/webhooks/outbox.py): written with the job change causing it.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    event TEXT NOT NULL,
    url TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    owner TEXT,
    lease_until REAL,
    last_status_code INTEGER,
    last_error TEXT,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS webhook_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS webhook_job ON webhook_deliveries (job_id, seq);
-- The event journal (kiapi_core/jobs/journal.py): one row per job change, with its Job JSON.
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
-- Queued jobs counted per (priority, seq >> QUEUE_BUCKET_BITS): a job's queue position sums a
-- few bucket counts and counts within one bucket, instead of counting every job ahead (which
-- made each read of a deep queue cost in proportion to its depth). Kept by triggers, so every
-- process writing the database (server, worker) keeps it right.
CREATE TABLE IF NOT EXISTS queue_buckets (
    priority INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (priority, bucket)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS queue_in AFTER INSERT ON jobs WHEN new.status = 'queued'
BEGIN
    INSERT INTO queue_buckets VALUES (new.priority, new.seq >> 9, 1)
        ON CONFLICT DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS queue_move AFTER UPDATE OF status, priority ON jobs
WHEN (old.status = 'queued') <> (new.status = 'queued')
    OR (old.status = 'queued' AND old.priority <> new.priority)
BEGIN
    UPDATE queue_buckets SET n = n - 1 WHERE old.status = 'queued'
        AND priority = old.priority AND bucket = old.seq >> 9;
    DELETE FROM queue_buckets WHERE old.status = 'queued'
        AND priority = old.priority AND bucket = old.seq >> 9 AND n <= 0;
    INSERT INTO queue_buckets SELECT new.priority, new.seq >> 9, 1 WHERE new.status = 'queued'
        ON CONFLICT DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS queue_out AFTER DELETE ON jobs WHEN old.status = 'queued'
BEGIN
    UPDATE queue_buckets SET n = n - 1 WHERE priority = old.priority AND bucket = old.seq >> 9;
    DELETE FROM queue_buckets WHERE priority = old.priority AND bucket = old.seq >> 9 AND n <= 0;
END;
"""
# The shift in the triggers above: 512 seqs per bucket.
QUEUE_BUCKET_BITS = 9
# Counted again at every open, in one transaction with the triggers' writes: a database from an
# older release (or edited by hand) starts right.
RECOUNT_QUEUE = """
DELETE FROM queue_buckets;
INSERT INTO queue_buckets SELECT priority, seq >> 9, COUNT(*) FROM jobs WHERE status = 'queued'
    GROUP BY priority, seq >> 9;
"""


def _migrate(conn: sqlite3.Connection) -> None:
    for table, column, definition in MIGRATIONS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


def _lenient_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: someone else holds the lock; the call can be re-run."""
    return isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorcode", None) in (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
    )


class StoreBusy(Exception):
    """The database stayed locked by another process for longer than the API waits (503)."""

    def __init__(self, waited_s: float | None = None) -> None:
        held = f" for {waited_s:g}s (KIAPI_STORE_BUSY_TIMEOUT_S)" if waited_s is not None else ""
        super().__init__(
            f"the job store is busy: kiapi.db is locked by another process{held}; retry shortly"
        )


class Database:
    """Hands each thread its own connection (sqlite3 objects must not cross threads)."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float = 30.0,
        wait_s: float = 5.0,
        reserve_bytes: int = 0,
    ) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self.wait_s = wait_s
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
        self._loop_thread: int | None = None
        self._waiters: ThreadPoolExecutor | None = None
        conn = self.connect()
        conn.executescript(SCHEMA)
        _migrate(conn)
        conn.executescript(AFTER_MIGRATIONS)
        with self.transaction() as tx:
            for statement in RECOUNT_QUEUE.split(";")[:-1]:
                tx.execute(statement)
        self.ensure_reserve()

    def _busy_timeout_ms(self) -> int:
        if threading.get_ident() == self._loop_thread:
            return 0
        if threading.current_thread().name.startswith(_WAITER_PREFIX):
            return int(self.wait_s * 1000)
        return int(self.busy_timeout_s * 1000)

    def serve_from_this_thread(self) -> None:
        """Mark the calling thread (the event loop's) as one that must never wait for a lock."""
        self._loop_thread = threading.get_ident()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.execute("PRAGMA busy_timeout=0")

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args)`` from the event loop: at once if the database is free, else off the loop.

        Re-running is safe: a busy database refuses a transaction at its ``BEGIN``, before it
        changed anything.
        """
        try:
            return fn(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
        if self._waiters is None:
            self._waiters = ThreadPoolExecutor(4, thread_name_prefix=_WAITER_PREFIX)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._waiters, functools.partial(fn, *args, **kwargs))
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise StoreBusy(self.wait_s) from None
            raise

    def connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE) where they matter.
            timeout_ms = self._busy_timeout_ms()
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=timeout_ms / 1000
            )
            conn.row_factory = sqlite3.Row
            # Text that is not UTF-8 (a hand edit, a damaged page) would make sqlite3 raise on
            # the whole query; with replacement characters the row shows, and a page with it.
            conn.text_factory = _lenient_text
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across process crashes in WAL mode (only power loss can drop
            # the last commits), and much cheaper than FULL for frequent progress updates.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={timeout_ms}")
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
        if self._waiters is not None:
            self._waiters.shutdown(wait=False)
            self._waiters = None
        with self._lock:
            for conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()
        self._local = threading.local()
