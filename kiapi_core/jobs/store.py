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

import bisect
import builtins
import json
import math
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from kiapi_core.ids import is_job_id, new_job_id
from kiapi_core.jobs.journal import JournalEntry, event_key
from kiapi_core.jobs.status import TERMINAL, JobStatus
from kiapi_core.state.sqlite import QUEUE_BUCKET_BITS, Database
from kiapi_core.web.body import JsonRefused, check_values
from kiapi_core.webhooks import outbox
from kiapi_core.webhooks.spec import WebhookSpec

RESTART_ERROR = "interrupted by server restart"
DEADLINE_ERROR = "deadline passed before start"
# A job's priority (X-Kiapi-Priority, PATCH /v1/jobs/{id}): higher runs first, FIFO within one.
PRIORITY_MIN, PRIORITY_MAX = -10, 10
DAMAGED_ERROR = "the stored record of this job is damaged"
# A ``\udXXX`` escape in stored text: legacy rows (written ASCII-escaped) hold them as pairs
# for emoji; only then is a stored value worth a walk for a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class NotStrictJson(ValueError):
    """A value the job store will not write: every answer that showed it would fail."""


def strict_dumps(value: Any, what: str) -> str:
    """``value`` as strict JSON text (finite numbers, valid Unicode), or NotStrictJson."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        if not text.isascii():
            text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NotStrictJson(
            f"{what} is not strict JSON: a string holds an unpaired UTF-16 surrogate"
            f" ({exc.object[exc.start]!a})"
        ) from None
    except ValueError as exc:
        raise NotStrictJson(
            f"{what} is not strict JSON ({exc}: NaN and Infinity have no JSON form)"
        ) from None
    except (TypeError, RecursionError) as exc:
        raise NotStrictJson(f"{what} is not JSON ({type(exc).__name__}: {exc})") from None
    return text


def check_progress(progress: float | None, label: str | None, eta_at: float | None = None) -> None:
    """NotStrictJson unless ``progress`` and ``eta_at`` are finite (or None) and ``label`` a
    string (or None)."""
    for name, value in (("progress", progress), ("eta_at", eta_at)):
        if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
            raise NotStrictJson(f"{name} {value!r} is not a finite number")
    if label is not None and not isinstance(label, str):
        raise NotStrictJson(f"progress label {label!r} is not a string")


class DamagedRecord(ValueError):
    """A stored value that is not what the store writes (strict JSON of the right shape)."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of the float range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# Made once: json.loads with hooks would build a decoder per call, on every read of a job.
_STRICT = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


def strict_loads(text: Any, column: str, kind: type | tuple[type, ...]) -> Any:
    """A stored JSON column, refused (DamagedRecord) unless strict JSON of type ``kind``."""
    if not isinstance(text, str):
        raise DamagedRecord(f"{column}: {type(text).__name__} instead of JSON text")
    try:
        data = _STRICT.decode(text)
        if _SURROGATE_ESCAPE.search(text):
            check_values(data, sys.getrecursionlimit())
    except RecursionError:
        raise DamagedRecord(f"{column}: nested too deep") from None
    except JsonRefused as exc:
        raise DamagedRecord(f"{column}: {exc}") from None
    except ValueError as exc:
        raise DamagedRecord(f"{column}: not strict JSON ({str(exc)[:200]})") from None
    if not isinstance(data, kind):
        raise DamagedRecord(f"{column}: {type(data).__name__} instead of the expected type")
    return data


class RecordReader:
    """Reads one stored job field by field; a damaged field gets a blank value and a note.

    So a record that is not what the store writes (a bug, an older version, a hand edit)
    still shows as a job with its id and an error saying what is wrong, and a listing that
    contains it answers with the rest, instead of every read failing.
    """

    def __init__(self) -> None:
        self.problems: list[str] = []

    def json(self, column: str, text: Any, kind: type | tuple[type, ...], blank: Any) -> Any:
        try:
            return strict_loads(text, column, kind)
        except DamagedRecord as exc:
            self.problems.append(str(exc))
            return blank

    def number(self, column: str, value: Any) -> float | None:
        if type(value) is float and value - value == 0.0:  # finite: the path of every read
            return value
        if value is None or value == "":
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number):
            self.problems.append(f"{column}: {str(value)[:32]!r} is not a finite number")
            return None
        return number

    def text(self, column: str, value: Any, allowed: frozenset[str] | None = None) -> str | None:
        if (type(value) is str and (allowed is None or value in allowed)) or value is None:
            return value
        if not isinstance(value, str) or (allowed is not None and value not in allowed):
            self.problems.append(f"{column}: {str(value)[:32]!r} is not a valid value")
            return None
        return value

    def finish(self, job: JobRecord) -> JobRecord:
        if self.problems:
            job.damage = "; ".join(self.problems)
            job.error = f"{DAMAGED_ERROR} ({job.damage}); it cannot be shown in full or run"
        return job


STATUSES = frozenset(JobStatus.__members__)


@dataclass(frozen=True)
class IdempotencyKey:
    """An ``Idempotency-Key`` and what it was first sent with (a hash of the request)."""

    key: str
    fingerprint: str
    ttl_s: float


class IdempotencyConflict(Exception):
    """The key was first used with another request; ``job_id`` is the job it created."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class NotRetryable(Exception):
    """A retry of a job that is missing (status None), not failed or canceled, or retried."""

    def __init__(self, status: str | None, retried_by: str | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.retried_by = retried_by


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
    # What is wrong with the stored record, when it is not what the store writes; such a
    # job is shown with blanks and an error, and fails if a worker claims it.
    damage: str | None = None
    # The HTTP status the handler failed the job with (JobFailed / ApiError), if it did.
    error_status: int | None = None
    # The media type of the one file the job must save (a route answering with it raw).
    artifact_type: str | None = None
    priority: int = 0
    # Unix time by which the job must have started (Cancel-After), and by which it ends.
    deadline: float | None = None
    retry_of: str | None = None
    retried_by: str | None = None
    # ETA: Unix time a running job is expected to end (stored: its handler's estimate, or
    # the host's); and, not stored, when a queued one is expected to start (JobService).
    eta_at: float | None = None
    estimated_start_at: float | None = None
    # Seconds its model stays resident once idle after this job (None: the server's TTL).
    keep_alive_s: float | None = None
    # Not stored: this record answers a submit whose Idempotency-Key had created it before.
    replayed: bool = False
    # The webhook asked for (WebhookSpec.to_json()) and, when read with it, its deliveries.
    webhook: dict[str, Any] | None = None
    deliveries: builtins.list[dict[str, Any]] | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """The Job JSON of the API; ``eta_s`` counted down to ``now`` (default: this moment;
        a journal entry's own time, so the entry reads the same whenever it is read)."""
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
            "priority": self.priority,
            "deadline": self.deadline,
            "retry_of": self.retry_of,
            "retried_by": self.retried_by,
            "webhook": self.webhook_json(),
            "eta_s": (
                round(max(self.eta_at - (time.time() if now is None else now), 0.0), 3)
                if self.status == "running" and self.eta_at is not None
                else None
            ),
            "estimated_start_at": self.estimated_start_at if self.status == "queued" else None,
            "keep_alive": self.keep_alive_s,
        }

    def webhook_json(self) -> dict[str, Any] | None:
        if self.webhook is None:
            return None
        shown = {"url": self.webhook.get("url"), "events": self.webhook.get("events")}
        return shown if self.deliveries is None else {**shown, "deliveries": self.deliveries}

    def event_payload(self, event: str) -> dict[str, Any]:
        """What a webhook delivers: the Job JSON of this moment, and which event it is."""
        return {**self.to_json(), "event": event}


@runtime_checkable
class JobStore(Protocol):
    """The jobs a node can see. Every change bumps the job's ``version``."""

    def create(
        self,
        job_type: str,
        params: dict[str, Any],
        max_queue: int,
        *,
        artifact_type: str | None = None,
        priority: int = 0,
        cancel_after_s: float | None = None,
        idempotency: IdempotencyKey | None = None,
        retry_of: str | None = None,
        webhook: dict[str, Any] | None = None,
        keep_alive_s: float | None = None,
    ) -> JobRecord:
        """A new queued job; or, for a known ``idempotency`` key, the job it created
        (``replayed``), IdempotencyConflict when the key came with another request. With
        ``retry_of``: NotRetryable unless that job failed or was canceled and is not retried
        yet; it is linked to the new job (``retried_by``) in the same step. ``artifact_type``:
        the job must save exactly one file of this media type, or it fails. ``webhook``:
        WebhookSpec JSON; its events are put in the outbox with the changes causing them."""
        ...

    def set_priority(self, job_id: str, priority: int) -> JobRecord | None:
        """Change a queued job's priority; the job as it is now (unchanged unless queued)."""
        ...

    def expire_deadlines(self) -> builtins.list[str]:
        """End ``canceled`` the queued jobs whose deadline passed; their ids."""
        ...

    def forget_idempotency(self, keys: builtins.list[str]) -> None:
        """Drop keys whose request was refused after all (its jobs canceled at once)."""
        ...

    def get(self, job_id: str) -> JobRecord | None: ...
    def list(
        self, *, status: str | None, job_type: str | None, limit: int, cursor: int | None
    ) -> tuple[builtins.list[JobRecord], int | None]: ...
    def claim_next(self, worker: str, types: frozenset[str] | None = None) -> JobRecord | None: ...
    def set_progress(
        self,
        job_id: str,
        progress: float | None,
        label: str | None,
        eta_at: float | None = None,
    ) -> None:
        """A running job's progress; None keeps what is stored (``eta_at``: its expected end)."""
        ...

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
        error_status: int | None = None,
    ) -> bool: ...
    def cancel(self, job_id: str) -> JobRecord | None: ...
    def cancel_requested(self, job_id: str) -> bool: ...
    def running(self) -> builtins.list[JobRecord]: ...
    def recover(self) -> builtins.list[str]: ...
    def sweep_finished(self, ttl_s: float, now: float | None = None) -> int:
        """Retention: delete the jobs that finished more than ``ttl_s`` ago (0 = keep all), with
        their journal entries and webhook deliveries. A job with a delivery still pending stays
        until it is sent or given up. Returns how many were deleted."""
        ...

    def waiting_count(self) -> int: ...
    def queue_counts(self) -> tuple[int, int]:
        """Waiting and running jobs, in one read (``/health`` asks under load)."""
        ...

    def fail_unhandled(
        self, handled: frozenset[str], error: Callable[[str], str]
    ) -> builtins.list[str]:
        """End ``failed`` (unavailable) every queued job whose type is not ``handled``, with
        ``error(type)``; their ids."""
        ...

    def recent_duration_s(self, job_type: str) -> float | None: ...

    # -- the event journal (kiapi_core/jobs/journal.py) ----------------------------------
    def events_after(
        self,
        after: str | None,
        *,
        job_id: str | None = None,
        job_type: str | None = None,
        status: str | None = None,
        limit: int = 1000,
    ) -> builtins.list[JournalEntry]:
        """Journal entries newer than ``after`` (all retained ones for None), oldest first."""
        ...

    def event_bounds(self) -> tuple[str | None, str | None]:
        """The ids of the oldest and the newest retained entries (None, None when empty)."""
        ...

    def last_event_id(self, job_id: str) -> str | None:
        """The id of the newest entry about ``job_id``, if one is retained."""
        ...


def _row(row: sqlite3.Row) -> JobRecord:
    r = RecordReader()
    return r.finish(
        JobRecord(
            id=row["id"],
            type=row["type"],
            status=r.text("status", row["status"], STATUSES) or "failed",
            params=r.json("params", row["params"], dict, {}),
            created_at=r.number("created_at", row["created_at"]) or 0.0,
            seq=row["seq"],
            result=r.json("result", row["result"], dict, None)
            if row["result"] is not None
            else None,
            artifacts=r.json("artifacts", row["artifacts"], list, []),
            error=r.text("error", row["error"]),
            started_at=r.number("started_at", row["started_at"]),
            finished_at=r.number("finished_at", row["finished_at"]),
            progress=r.number("progress", row["progress"]),
            progress_label=r.text("progress_label", row["progress_label"]) or "",
            cancel_requested=bool(row["cancel_requested"]),
            error_kind=row["error_kind"],
            worker=row["worker"],
            version=row["version"] if isinstance(row["version"], int) else 0,
            error_status=row["error_status"] if isinstance(row["error_status"], int) else None,
            artifact_type=r.text("artifact_type", row["artifact_type"]),
            priority=row["priority"] if isinstance(row["priority"], int) else 0,
            deadline=r.number("deadline", row["deadline"]),
            retry_of=r.text("retry_of", row["retry_of"]),
            retried_by=r.text("retried_by", row["retried_by"]),
            webhook=r.json("webhook", row["webhook"], dict, None)
            if row["webhook"] is not None
            else None,
            eta_at=r.number("eta_at", row["eta_at"]),
            keep_alive_s=r.number("keep_alive_s", row["keep_alive_s"]),
        )
    )


def _emit(conn: sqlite3.Connection, job_id: str, event: str) -> None:
    """Put ``event`` in the outbox if the job's webhook wants it, in the caller's transaction;
    progress at most every ``progress_ms``."""
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None or row["webhook"] is None:
        return
    job = _row(row)
    spec = WebhookSpec.from_json(job.webhook)
    if spec is None or event not in spec.events:
        return
    if event == "progress":
        now, last = time.time(), row["webhook_progress_at"]
        if isinstance(last, float) and now - last < spec.progress_ms / 1000:
            return
        conn.execute("UPDATE jobs SET webhook_progress_at = ? WHERE id = ?", (now, job_id))
    payload = strict_dumps(job.event_payload(event), "the webhook payload")
    outbox.enqueue(conn, job_id, event, job.version, spec.url, payload)


def _emit_all(conn: sqlite3.Connection, job_ids: builtins.list[str], event: str) -> None:
    for job_id in job_ids:
        _emit(conn, job_id, event)


# The mean run time of a type's last 20 successes (index jobs_done_type: no walk past the
# queued jobs of the type, however many).
RECENT_DURATION = (
    "SELECT AVG(finished_at - started_at) FROM (SELECT finished_at, started_at FROM jobs"
    " WHERE type = ? AND status = 'succeeded' ORDER BY seq DESC LIMIT 20)"
)
_HIGHER = "SELECT COALESCE(SUM(n), 0) FROM queue_buckets WHERE priority > ?"
_EARLIER_BUCKETS = "SELECT COALESCE(SUM(n), 0) FROM queue_buckets WHERE priority = ? AND bucket < ?"
_IN_BUCKET = (
    "SELECT seq FROM jobs WHERE status = 'queued' AND priority = ? AND seq >= ? AND seq < ?"
    " ORDER BY seq"
)
_EXPIRE = (
    "UPDATE jobs SET status = 'canceled', finished_at = ?, progress_label = 'canceled',"
    " error = ?, error_kind = 'canceled', version = version + 1"
    " WHERE status = 'queued' AND deadline IS NOT NULL AND deadline <= ? RETURNING id"
)


_WAITING = "SELECT COALESCE(SUM(n), 0) FROM queue_buckets"
_RUNNING = "SELECT COUNT(*) FROM jobs WHERE status = 'running'"


def _set_positions(conn: sqlite3.Connection, jobs: builtins.list[JobRecord]) -> None:
    """``queue_position`` of the queued ``jobs``: jobs of higher priority, plus earlier ones of
    the same priority (claim order). Bucket counts cover all but the job's own bucket, whose
    seqs are read once per bucket the jobs fall in, so the cost does not grow with depth."""
    groups: dict[tuple[int, int], builtins.list[JobRecord]] = {}
    for job in jobs:
        if job.status == "queued":
            groups.setdefault((job.priority, job.seq >> QUEUE_BUCKET_BITS), []).append(job)
    higher: dict[int, int] = {}
    for (priority, bucket), members in groups.items():
        if priority not in higher:
            higher[priority] = conn.execute(_HIGHER, (priority,)).fetchone()[0]
        (earlier,) = conn.execute(_EARLIER_BUCKETS, (priority, bucket)).fetchone()
        last = max(j.seq for j in members)
        start = bucket << QUEUE_BUCKET_BITS
        seqs = [r[0] for r in conn.execute(_IN_BUCKET, (priority, start, last))]
        for job in members:
            job.queue_position = higher[priority] + earlier + bisect.bisect_left(seqs, job.seq) + 1


# Decoded records kept for reads (a few MB at most): most reads of a job find its row as it was.
_DECODED_MAX = 4096
# Finished before the cutoff, oldest first, none with a webhook delivery still to make. Named
# index: without statistics the planner would walk jobs_claim's terminal entries and sort them.
_RETIRED = (
    "SELECT id FROM jobs INDEXED BY jobs_finished"
    " WHERE status IN ('succeeded', 'failed', 'canceled')"
    " AND finished_at < ? AND NOT EXISTS (SELECT 1 FROM webhook_deliveries w"
    " WHERE w.job_id = jobs.id AND w.status = 'pending') ORDER BY finished_at LIMIT ?"
)
_SWEEP_BATCH = 500


# How often (in entries) the journal drops what is past its retention.
_TRIM_EVERY = 256


class SqliteJobStore:
    def __init__(self, db: Database, events_retain: int = 100_000) -> None:
        self.db = db
        self.events_retain = events_retain
        # job id -> (its row's values, the record decoded from them). A read whose row is
        # unchanged (the whole row compared, so any write, even a hand edit, is seen) skips
        # the JSON decoding and checks, the largest part of serving GET /v1/jobs/{id}.
        self._decoded: dict[str, tuple[tuple[Any, ...], JobRecord]] = {}
        # job id -> (the database's state when it was read, what get() answered then). The
        # state is PRAGMA data_version (moves at any commit by another connection: a worker,
        # a hand edit) with the reading connection's own total_changes: while both hold, no
        # row of any table changed, so the answer is the same without reading the row.
        self._answered: dict[str, tuple[tuple[sqlite3.Connection, int, int], JobRecord]] = {}

    def _journal(self, conn: sqlite3.Connection, ids: Iterable[str]) -> None:
        """Record the jobs ``ids`` as they are now, in the transaction that changed them."""
        for job_id in ids:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                continue
            job = self._with_position(conn, _row(row))
            data = strict_dumps(job.to_json(), "the job")
            cur = conn.execute(
                "INSERT INTO events (job_id, type, status, data) VALUES (?, ?, ?, ?)",
                (job.id, job.type, job.status, data),
            )
            seq = cur.lastrowid or 0
            if seq % _TRIM_EVERY == 0:
                conn.execute("DELETE FROM events WHERE seq <= ?", (seq - self.events_retain,))

    def _read(self, row: sqlite3.Row) -> JobRecord:
        values = tuple(row)
        hit = self._decoded.get(row["id"])
        if hit is None or hit[0] != values:
            if len(self._decoded) >= _DECODED_MAX:
                self._decoded.clear()
            hit = (values, _row(row))
            self._decoded[hit[1].id] = hit
        # A copy per read: callers set fields (queue_position, replayed) on what they get.
        job = object.__new__(JobRecord)
        job.__dict__.update(hit[1].__dict__)
        return job

    def _with_position(self, conn: sqlite3.Connection, job: JobRecord) -> JobRecord:
        _set_positions(conn, [job])
        if job.webhook is not None:
            job.deliveries = outbox.shown(conn, job.id)
        return job

    def create(
        self,
        job_type: str,
        params: dict[str, Any],
        max_queue: int,
        *,
        artifact_type: str | None = None,
        priority: int = 0,
        cancel_after_s: float | None = None,
        idempotency: IdempotencyKey | None = None,
        retry_of: str | None = None,
        webhook: dict[str, Any] | None = None,
        keep_alive_s: float | None = None,
    ) -> JobRecord:
        now = time.time()
        job = JobRecord(
            id=new_job_id(),
            type=job_type,
            status="queued",
            params=params,
            created_at=now,
            artifact_type=artifact_type,
            priority=priority,
            deadline=now + cancel_after_s if cancel_after_s is not None else None,
            retry_of=retry_of,
            webhook=webhook,
            keep_alive_s=keep_alive_s,
        )
        params_text = strict_dumps(params, "the job's params")
        webhook_text = strict_dumps(webhook, "the job's webhook") if webhook else None
        # One transaction: two requests with one key cannot both create a job.
        with self.db.transaction() as conn:
            if idempotency is not None:
                found = self._known_key(conn, idempotency, now)
                if found is not None:
                    return found
            if retry_of is not None:
                old = conn.execute(
                    "SELECT status, retried_by FROM jobs WHERE id = ?", (retry_of,)
                ).fetchone()
                if old is None or old["status"] not in ("failed", "canceled") or old["retried_by"]:
                    raise NotRetryable(old and old["status"], old and old["retried_by"])
            (waiting,) = conn.execute(_WAITING).fetchone()
            if waiting >= max_queue:
                raise QueueFull(waiting, max_queue)
            cur = conn.execute(
                "INSERT INTO jobs (id, type, status, params, created_at, artifact_type, priority,"
                " deadline, retry_of, webhook, keep_alive_s) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.type,
                    params_text,
                    now,
                    artifact_type,
                    priority,
                    job.deadline,
                    retry_of,
                    webhook_text,
                    keep_alive_s,
                ),
            )
            job.seq = cur.lastrowid or 0
            if retry_of is not None:
                conn.execute(
                    "UPDATE jobs SET retried_by = ?, version = version + 1 WHERE id = ?",
                    (job.id, retry_of),
                )
            self._journal(conn, [job.id] if retry_of is None else [retry_of, job.id])
            if idempotency is not None:
                conn.execute(
                    "INSERT INTO idempotency (key, fingerprint, job_id, created_at, expires_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        idempotency.key,
                        idempotency.fingerprint,
                        job.id,
                        now,
                        now + idempotency.ttl_s,
                    ),
                )
            self._with_position(conn, job)
        return job

    def _known_key(
        self, conn: sqlite3.Connection, idempotency: IdempotencyKey, now: float
    ) -> JobRecord | None:
        conn.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))
        row = conn.execute(
            "SELECT fingerprint, job_id FROM idempotency WHERE key = ?", (idempotency.key,)
        ).fetchone()
        if row is None:
            return None
        if row["fingerprint"] != idempotency.fingerprint:
            raise IdempotencyConflict(row["job_id"])
        old = conn.execute("SELECT * FROM jobs WHERE id = ?", (row["job_id"],)).fetchone()
        if old is None:
            # Its job is gone (retention): the key is free for the job this request makes.
            conn.execute("DELETE FROM idempotency WHERE key = ?", (idempotency.key,))
            return None
        job = self._with_position(conn, _row(old))
        job.replayed = True
        return job

    def forget_idempotency(self, keys: builtins.list[str]) -> None:
        with self.db.transaction() as conn:
            conn.executemany("DELETE FROM idempotency WHERE key = ?", [(k,) for k in keys])

    def set_priority(self, job_id: str, priority: int) -> JobRecord | None:
        with self.db.transaction() as conn:
            cur = conn.execute(
                "UPDATE jobs SET priority = ?, version = version + 1"
                " WHERE id = ? AND status = 'queued'",
                (priority, job_id),
            )
            if cur.rowcount:
                self._journal(conn, [job_id])
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._with_position(conn, _row(row)) if row is not None else None

    def expire_deadlines(self) -> builtins.list[str]:
        now = time.time()
        # A read first: most rounds find nothing, and take no write lock for it.
        due = (
            self.db.connect()
            .execute(
                "SELECT 1 FROM jobs WHERE status = 'queued' AND deadline IS NOT NULL"
                " AND deadline <= ? LIMIT 1",
                (now,),
            )
            .fetchone()
        )
        if due is None:
            return []
        with self.db.transaction() as conn:
            expired = [r["id"] for r in conn.execute(_EXPIRE, (now, DEADLINE_ERROR, now))]
            _emit_all(conn, expired, "completed")
            self._journal(conn, expired)
            return expired

    def get(self, job_id: str) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        conn = self.db.connect()
        state = (conn, conn.execute("PRAGMA data_version").fetchone()[0], conn.total_changes)
        hit = self._answered.get(job_id)
        if hit is not None and hit[0] == state:
            job = hit[1]
        else:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job = self._with_position(conn, self._read(row))
            if len(self._answered) >= _DECODED_MAX:
                self._answered.clear()
            self._answered[job_id] = (state, job)
        # A copy per read: callers set fields (eta, estimated start) on what they get.
        out = object.__new__(JobRecord)
        out.__dict__.update(job.__dict__)
        return out

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
        jobs = [self._read(r) for r in rows[:limit]]
        _set_positions(conn, jobs)
        return jobs, (jobs[-1].seq if more and jobs else None)

    def claim_next(self, worker: str, types: frozenset[str] | None = None) -> JobRecord | None:
        with self.db.transaction() as conn:
            sql = "SELECT * FROM jobs WHERE status = 'queued'"
            args: list[Any] = []
            if types is not None:
                sql += f" AND type IN ({','.join('?' * len(types))})"
                args.extend(sorted(types))
            now = time.time()
            # A job whose deadline passed never starts, whether or not a sweep saw it yet.
            expired = [r["id"] for r in conn.execute(_EXPIRE, (now, DEADLINE_ERROR, now))]
            self._journal(conn, expired)
            _emit_all(conn, expired, "completed")
            row = conn.execute(sql + " ORDER BY priority DESC, seq LIMIT 1", args).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, worker = ?, eta_at = NULL,"
                " progress_label = 'running', version = version + 1 WHERE id = ?",
                (now, worker, row["id"]),
            )
            _emit(conn, row["id"], "start")
            self._journal(conn, [row["id"]])
        job = _row(row)
        job.status, job.started_at, job.worker = "running", now, worker
        job.progress_label = "running"
        job.version += 1
        return job

    def set_progress(
        self,
        job_id: str,
        progress: float | None,
        label: str | None,
        eta_at: float | None = None,
    ) -> None:
        check_progress(progress, label, eta_at)
        with self.db.transaction() as conn:
            changed = conn.execute(
                "UPDATE jobs SET progress = COALESCE(?, progress),"
                " progress_label = COALESCE(?, progress_label), eta_at = COALESCE(?, eta_at),"
                " version = version + 1 WHERE id = ? AND status = 'running' RETURNING webhook",
                (progress, label, eta_at, job_id),
            ).fetchone()
            if changed is None:
                return
            self._journal(conn, [job_id])
            if '"progress"' in (changed[0] or ""):
                _emit(conn, job_id, "progress")

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
        error_status: int | None = None,
    ) -> bool:
        """Move a running job (still owned by ``worker``) to a terminal state.

        Returns False when the job is no longer ours (timed out, recovered): the caller must
        then discard what it produced.
        """
        label = {"succeeded": "done", "failed": "failed", "canceled": "canceled"}[status]
        progress_sql = "1.0" if status == "succeeded" else "progress"
        values = (
            status,
            strict_dumps(result, "the job's result") if result is not None else None,
            strict_dumps(artifacts or [], "the job's artifacts"),
            error,
            error_kind,
            error_status,
            time.time(),
            label,
            job_id,
            worker,
        )

        def update(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE jobs SET status = ?, result = ?, artifacts = ?, error = ?, error_kind = ?,"
                f" error_status = ?, finished_at = ?, progress = {progress_sql}, progress_label = ?,"
                " version = version + 1 WHERE id = ? AND status = 'running' AND worker IS ?",
                values,
            )
            if cur.rowcount != 1:
                return False
            _emit(conn, job_id, "completed")
            self._journal(conn, [job_id])
            return True

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
                _emit(conn, job_id, "completed")
                self._journal(conn, [job_id])
            elif row["status"] == "running" and not row["cancel_requested"]:
                conn.execute(
                    "UPDATE jobs SET cancel_requested = 1, version = version + 1 WHERE id = ?",
                    (job_id,),
                )
                self._journal(conn, [job_id])
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
            ids = [r["id"] for r in rows]
            self._journal(conn, ids)
            _emit_all(conn, ids, "completed")
            return ids

        return self.db.write(update, essential=True)

    def sweep_finished(self, ttl_s: float, now: float | None = None) -> int:
        if ttl_s <= 0:
            return 0
        cutoff = (time.time() if now is None else now) - ttl_s

        def delete(conn: sqlite3.Connection) -> int:
            ids = [(r["id"],) for r in conn.execute(_RETIRED, (cutoff, _SWEEP_BATCH))]
            conn.executemany("DELETE FROM webhook_deliveries WHERE job_id = ?", ids)
            conn.executemany("DELETE FROM events WHERE job_id = ?", ids)
            conn.executemany("DELETE FROM jobs WHERE id = ?", ids)
            return len(ids)

        removed = 0
        # In batches, each its own transaction: a first sweep over a year of jobs must not hold
        # the write lock (and every submit waiting on it) for seconds.
        while (n := self.db.write(delete, essential=True)) > 0:
            removed += n
            if n < _SWEEP_BATCH:
                break
        return removed

    def fail_unhandled(
        self, handled: frozenset[str], error: Callable[[str], str]
    ) -> builtins.list[str]:
        def update(conn: sqlite3.Connection) -> builtins.list[str]:
            rows = conn.execute("SELECT id, type FROM jobs WHERE status = 'queued'").fetchall()
            gone = sorted({r["type"] for r in rows} - handled)
            for job_type in gone:
                conn.execute(
                    "UPDATE jobs SET status = 'failed', error = ?, error_kind = 'unavailable',"
                    " finished_at = ?, progress_label = 'failed', version = version + 1"
                    " WHERE status = 'queued' AND type = ?",
                    (error(job_type), time.time(), job_type),
                )
            ids = [r["id"] for r in rows if r["type"] in gone]
            self._journal(conn, ids)
            _emit_all(conn, ids, "completed")
            return ids

        return self.db.write(update, essential=True)

    def waiting_count(self) -> int:
        (n,) = self.db.connect().execute(_WAITING).fetchone()
        return int(n)

    def queue_counts(self) -> tuple[int, int]:
        waiting, running = (
            self.db.connect().execute(f"SELECT ({_WAITING}), ({_RUNNING})").fetchone()
        )
        return int(waiting), int(running)

    def recent_duration_s(self, job_type: str) -> float | None:
        row = self.db.connect().execute(RECENT_DURATION, (job_type,)).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    # -- the event journal ---------------------------------------------------------------
    def events_after(
        self,
        after: str | None,
        *,
        job_id: str | None = None,
        job_type: str | None = None,
        status: str | None = None,
        limit: int = 1000,
    ) -> builtins.list[JournalEntry]:
        sql = "SELECT seq, job_id, type, status, data FROM events WHERE seq > ?"
        args: list[Any] = [event_key(after)[0] if after is not None else 0]
        for column, value in (("job_id", job_id), ("type", job_type), ("status", status)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        args.append(limit)
        rows = self.db.connect().execute(sql + " ORDER BY seq LIMIT ?", args).fetchall()
        return [JournalEntry(str(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    def event_bounds(self) -> tuple[str | None, str | None]:
        low, high = self.db.connect().execute("SELECT MIN(seq), MAX(seq) FROM events").fetchone()
        return (str(low) if low is not None else None, str(high) if high is not None else None)

    def last_event_id(self, job_id: str) -> str | None:
        (seq,) = (
            self.db.connect()
            .execute("SELECT MAX(seq) FROM events WHERE job_id = ?", (job_id,))
            .fetchone()
        )
        return str(seq) if seq is not None else None
