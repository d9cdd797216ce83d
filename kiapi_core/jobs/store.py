"""Where jobs live. ``JobStore`` is the seam (DESIGN §9); ``SqliteJobStore`` the embedded default.

Everything a route or a worker needs to know about a job goes through this interface, so a
distributed backend can serve the same routes by implementing it over shared storage.

Restarts: a job that was running when the process died is not re-queued (its handler may have
had side effects, and a job that crashes the server would crash it again on every start). It
ends ``failed`` with the error ``interrupted by server restart`` and any file it had saved is
deleted; queued jobs stay queued and run; finished jobs and their files are kept. A graceful
stop (SIGTERM, Ctrl-C) does the same at once: running jobs stop at their next progress report
and end ``failed`` with ``interrupted by server shutdown``.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from kiapi_core.db import Database
from kiapi_core.ids import is_job_id, new_job_id
from kiapi_core.jobs.schemas import TERMINAL

RESTART_ERROR = "interrupted by server restart"


class QueueFull(Exception):
    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(f"the queue is full ({waiting} waiting, KIAPI_MAX_QUEUE={limit})")
        self.waiting = waiting
        self.limit = limit


@dataclass
class JobRecord:
    id: str
    type: str
    status: str
    params: dict[str, Any]
    created_at: float
    seq: int = 0
    result: dict[str, Any] | None = None
    artifacts: list[str] = field(default_factory=list)
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    progress: float | None = None
    progress_label: str = "queued"
    cancel_requested: bool = False
    error_kind: str | None = None
    worker: str | None = None
    queue_position: int | None = None
    version: int = 0
    # Runs of this job so far (the distributed backend re-runs a job whose worker was lost).
    attempt: int = 1

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_json(self) -> dict[str, Any]:
        """The Job JSON of the API."""
        return {
            "type": self.type,
            "params": self.params,
            "id": self.id,
            "status": self.status,
            "result": self.result,
            "artifacts": self.artifacts,
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": self.progress,
            "progress_label": self.progress_label,
            "queue_position": self.queue_position,
        }


@runtime_checkable
class JobStore(Protocol):
    """The jobs a node can see. Every change bumps the job's ``version``."""

    def create(self, job_type: str, params: dict[str, Any], max_queue: int) -> JobRecord: ...
    def get(self, job_id: str) -> JobRecord | None: ...
    def list(
        self, *, status: str | None, job_type: str | None, limit: int, cursor: int | None
    ) -> tuple[builtins.list[JobRecord], int | None]: ...
    def claim_next(self, worker: str, types: frozenset[str] | None = None) -> JobRecord | None: ...
    def set_progress(self, job_id: str, progress: float | None, label: str | None) -> None: ...
    def finish(
        self,
        job_id: str,
        status: str,
        *,
        worker: str | None,
        result: dict[str, Any] | None = None,
        artifacts: builtins.list[str] | None = None,
        error: str | None = None,
        error_kind: str | None = None,
    ) -> bool: ...
    def cancel(self, job_id: str) -> JobRecord | None: ...
    def cancel_requested(self, job_id: str) -> bool: ...
    def running(self) -> builtins.list[JobRecord]: ...
    def recover(self) -> builtins.list[str]: ...
    def waiting_count(self) -> int: ...
    def recent_duration_s(self, job_type: str) -> float | None: ...


def _row(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        type=row["type"],
        status=row["status"],
        params=json.loads(row["params"]),
        created_at=row["created_at"],
        seq=row["seq"],
        result=json.loads(row["result"]) if row["result"] is not None else None,
        artifacts=json.loads(row["artifacts"]),
        error=row["error"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        progress=row["progress"],
        progress_label=row["progress_label"],
        cancel_requested=bool(row["cancel_requested"]),
        error_kind=row["error_kind"],
        worker=row["worker"],
        version=row["version"],
    )


class SqliteJobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def _with_position(self, conn: sqlite3.Connection, job: JobRecord) -> JobRecord:
        if job.status == "queued":
            (ahead,) = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND seq < ?", (job.seq,)
            ).fetchone()
            job.queue_position = ahead + 1
        return job

    def create(self, job_type: str, params: dict[str, Any], max_queue: int) -> JobRecord:
        job = JobRecord(
            id=new_job_id(), type=job_type, status="queued", params=params, created_at=time.time()
        )
        with self.db.transaction() as conn:
            (waiting,) = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued'"
            ).fetchone()
            if waiting >= max_queue:
                raise QueueFull(waiting, max_queue)
            cur = conn.execute(
                "INSERT INTO jobs (id, type, status, params, created_at)"
                " VALUES (?, ?, 'queued', ?, ?)",
                (job.id, job.type, json.dumps(params), job.created_at),
            )
            job.seq = cur.lastrowid or 0
            job.queue_position = waiting + 1
        return job

    def get(self, job_id: str) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        conn = self.db.connect()
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._with_position(conn, _row(row)) if row is not None else None

    def list(
        self, *, status: str | None, job_type: str | None, limit: int, cursor: int | None
    ) -> tuple[builtins.list[JobRecord], int | None]:
        sql = "SELECT * FROM jobs WHERE 1=1"
        args: list[Any] = []
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        if job_type is not None:
            sql += " AND type = ?"
            args.append(job_type)
        if cursor is not None:
            sql += " AND seq < ?"
            args.append(cursor)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit + 1)
        conn = self.db.connect()
        rows = conn.execute(sql, args).fetchall()
        more = len(rows) > limit
        jobs = [self._with_position(conn, _row(r)) for r in rows[:limit]]
        return jobs, (jobs[-1].seq if more and jobs else None)

    def claim_next(self, worker: str, types: frozenset[str] | None = None) -> JobRecord | None:
        with self.db.transaction() as conn:
            sql = "SELECT * FROM jobs WHERE status = 'queued'"
            args: list[Any] = []
            if types is not None:
                sql += f" AND type IN ({','.join('?' * len(types))})"
                args.extend(sorted(types))
            row = conn.execute(sql + " ORDER BY seq LIMIT 1", args).fetchone()
            if row is None:
                return None
            now = time.time()
            conn.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, worker = ?,"
                " progress_label = 'running', version = version + 1 WHERE id = ?",
                (now, worker, row["id"]),
            )
        job = _row(row)
        job.status, job.started_at, job.worker = "running", now, worker
        job.progress_label = "running"
        job.version += 1
        return job

    def set_progress(self, job_id: str, progress: float | None, label: str | None) -> None:
        conn = self.db.connect()
        conn.execute(
            "UPDATE jobs SET progress = COALESCE(?, progress),"
            " progress_label = COALESCE(?, progress_label), version = version + 1"
            " WHERE id = ? AND status = 'running'",
            (progress, label, job_id),
        )

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        worker: str | None,
        result: dict[str, Any] | None = None,
        artifacts: builtins.list[str] | None = None,
        error: str | None = None,
        error_kind: str | None = None,
    ) -> bool:
        """Move a running job (still owned by ``worker``) to a terminal state.

        Returns False when the job is no longer ours (timed out, recovered): the caller must
        then discard what it produced.
        """
        label = {"succeeded": "done", "failed": "failed", "canceled": "canceled"}[status]
        progress_sql = "1.0" if status == "succeeded" else "progress"
        values = (
            status,
            json.dumps(result) if result is not None else None,
            json.dumps(artifacts or []),
            error,
            error_kind,
            time.time(),
            label,
            job_id,
            worker,
        )

        def update(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE jobs SET status = ?, result = ?, artifacts = ?, error = ?, error_kind = ?,"
                f" finished_at = ?, progress = {progress_sql}, progress_label = ?,"
                " version = version + 1 WHERE id = ? AND status = 'running' AND worker IS ?",
                values,
            )
            return cur.rowcount == 1

        # Essential: a job whose end is not recorded would look "running" forever.
        return self.db.write(update, essential=True)

    def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel: a queued job ends at once; a running one is flagged for its worker."""
        with self.db.transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["status"] == "queued":
                conn.execute(
                    "UPDATE jobs SET status = 'canceled', finished_at = ?,"
                    " progress_label = 'canceled', error = 'canceled by request',"
                    " error_kind = 'canceled', version = version + 1 WHERE id = ?",
                    (time.time(), job_id),
                )
            elif row["status"] == "running" and not row["cancel_requested"]:
                conn.execute(
                    "UPDATE jobs SET cancel_requested = 1, version = version + 1 WHERE id = ?",
                    (job_id,),
                )
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row(row)

    def cancel_requested(self, job_id: str) -> bool:
        row = (
            self.db.connect()
            .execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
            .fetchone()
        )
        return bool(row and row[0])

    def running(self) -> builtins.list[JobRecord]:
        rows = self.db.connect().execute("SELECT * FROM jobs WHERE status = 'running'").fetchall()
        return [_row(r) for r in rows]

    def recover(self) -> builtins.list[str]:
        """After a restart nothing is running any more: those jobs fail with a clear error."""

        def update(conn: sqlite3.Connection) -> builtins.list[str]:
            rows = conn.execute("SELECT id FROM jobs WHERE status = 'running'").fetchall()
            conn.execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?,"
                " progress_label = 'failed', error_kind = 'interrupted', version = version + 1"
                " WHERE status = 'running'",
                (RESTART_ERROR, time.time()),
            )
            return [r["id"] for r in rows]

        return self.db.write(update, essential=True)

    def waiting_count(self) -> int:
        (n,) = (
            self.db.connect()
            .execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")
            .fetchone()
        )
        return int(n)

    def recent_duration_s(self, job_type: str) -> float | None:
        row = (
            self.db.connect()
            .execute(
                "SELECT AVG(finished_at - started_at) FROM (SELECT finished_at, started_at FROM jobs"
                " WHERE type = ? AND status = 'succeeded' ORDER BY seq DESC LIMIT 20)",
                (job_type,),
            )
            .fetchone()
        )
        return float(row[0]) if row and row[0] is not None else None
