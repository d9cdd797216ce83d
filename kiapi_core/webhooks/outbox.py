"""The durable outbox of webhook deliveries: rows written by the job store in the same
transaction as the change that causes them, claimed under a lease by whichever deliverer
(delivery.py) gets them first, and kept with their state for the job's ``webhook`` field.

SQLite: the table ``webhook_deliveries`` in kiapi.db (state/sqlite.py). Redis: the
``RedisOutbox`` in state/redis.py, written by the same Lua scripts that change the jobs.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from kiapi_core.state.sqlite import Database

# A job's ``webhook.deliveries`` shows its most recent ones.
SHOWN_DELIVERIES = 20


@dataclass(frozen=True)
class Delivery:
    """One event to send: ``id`` is the ``webhook-id`` of every attempt."""

    id: str
    job_id: str
    event: str
    url: str
    body: bytes
    attempts: int


@runtime_checkable
class Outbox(Protocol):
    def claim(self, owner: str, limit: int, lease_s: float) -> list[Delivery]:
        """Up to ``limit`` due deliveries, leased to ``owner`` for ``lease_s``."""
        ...

    def record(
        self,
        delivery: Delivery,
        owner: str,
        *,
        outcome: str,
        retry_in_s: float = 0.0,
        status_code: int | None = None,
        error: str | None = None,
    ) -> None:
        """After an attempt: ``outcome`` delivered, retry (in ``retry_in_s``) or failed."""
        ...

    def release_leases(self) -> None:
        """Forget every lease (the embedded node at start: no other deliverer is alive)."""
        ...


def delivery_id(job_id: str, event: str, version: int) -> str:
    # One job change makes at most one delivery per event: stable across the store's retries.
    return f"msg_{job_id}_{event}_{version}"


def enqueue(
    conn: sqlite3.Connection, job_id: str, event: str, version: int, url: str, payload: str
) -> None:
    """Add a delivery inside the caller's transaction (the job change that causes it)."""
    now = time.time()
    conn.execute(
        "INSERT OR IGNORE INTO webhook_deliveries (id, job_id, event, url, payload, created_at,"
        " next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (delivery_id(job_id, event, version), job_id, event, url, payload, now, now),
    )


def shown(conn: sqlite3.Connection, job_id: str) -> list[dict[str, Any]]:
    """The job's most recent deliveries, oldest first, as the Job JSON shows them."""
    rows = conn.execute(
        "SELECT * FROM webhook_deliveries WHERE job_id = ? ORDER BY seq DESC LIMIT ?",
        (job_id, SHOWN_DELIVERIES),
    ).fetchall()
    return [
        {
            "id": r["id"],
            "event": r["event"],
            "status": r["status"],
            "attempts": r["attempts"],
            "last_status_code": r["last_status_code"],
            "last_error": r["last_error"],
            "next_attempt_at": r["next_attempt_at"] if r["status"] == "pending" else None,
            "delivered_at": r["delivered_at"],
        }
        for r in reversed(rows)
    ]


# Due, and the oldest pending one of its job: a job's events go out in order, one at a time.
_DUE = (
    "d.status = 'pending' AND d.next_attempt_at <= :now"
    " AND (d.lease_until IS NULL OR d.lease_until <= :now)"
    " AND NOT EXISTS (SELECT 1 FROM webhook_deliveries o WHERE o.job_id = d.job_id"
    " AND o.status = 'pending' AND o.seq < d.seq)"
)


class SqliteOutbox:
    def __init__(self, db: Database) -> None:
        self.db = db

    def claim(self, owner: str, limit: int, lease_s: float) -> list[Delivery]:
        now = time.time()
        # A read first: most polls find nothing, and take no write lock for it.
        probe = self.db.connect().execute(
            f"SELECT 1 FROM webhook_deliveries d WHERE {_DUE} LIMIT 1", {"now": now}
        )
        if probe.fetchone() is None:
            return []
        with self.db.transaction() as conn:
            rows = conn.execute(
                "UPDATE webhook_deliveries SET owner = :owner, lease_until = :lease WHERE id IN"
                f" (SELECT d.id FROM webhook_deliveries d WHERE {_DUE} ORDER BY d.next_attempt_at"
                " LIMIT :limit) RETURNING id, job_id, event, url, payload, attempts",
                {"owner": owner, "lease": now + lease_s, "now": now, "limit": limit},
            ).fetchall()
        return [
            Delivery(
                r["id"], r["job_id"], r["event"], r["url"], r["payload"].encode(), r["attempts"]
            )
            for r in rows
        ]

    def record(
        self,
        delivery: Delivery,
        owner: str,
        *,
        outcome: str,
        retry_in_s: float = 0.0,
        status_code: int | None = None,
        error: str | None = None,
    ) -> None:
        now = time.time()
        status = "pending" if outcome == "retry" else outcome

        def update(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE webhook_deliveries SET status = ?1, attempts = attempts + 1,"
                " last_status_code = ?2, last_error = ?3, next_attempt_at = ?4, delivered_at = ?5,"
                " owner = NULL, lease_until = NULL,"
                # Sent or given up: the payload (up to a whole result) is not needed any more.
                " payload = CASE WHEN ?1 = 'pending' THEN payload ELSE '' END"
                " WHERE id = ?6 AND owner = ?7 AND status = 'pending'",
                (
                    status,
                    status_code,
                    error,
                    now + retry_in_s,
                    now if outcome == "delivered" else None,
                    delivery.id,
                    owner,
                ),
            )

        self.db.write(update)

    def release_leases(self) -> None:
        def update(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE webhook_deliveries SET owner = NULL, lease_until = NULL"
                " WHERE status = 'pending' AND owner IS NOT NULL"
            )

        self.db.write(update)
