"""When a queued job should start, and when a running one without an estimate should end.

Read-side estimates, made from a snapshot of the queue's state that is at most ``MAX_AGE_S``
old: the running jobs' expected ends, the recent run time of each job type and the number of
worker slots. Applying it to a job costs the same whatever the queue's depth: the job's
``queue_position`` (already read with it) says how many run before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kiapi_core.jobs.store import JobRecord, JobStore

MAX_AGE_S = 1.0


@dataclass
class QueueSnapshot:
    """The queue's state at ``at`` (monotonic): when each slot frees up, and run times."""

    at: float
    slots: int
    free_at: list[float | None]  # Unix time each slot frees up (None: unknown), soonest first
    typical_s: dict[str, float] = field(default_factory=dict)

    def typical(self, job_type: str) -> float | None:
        if job_type in self.typical_s:
            return self.typical_s[job_type]
        known = list(self.typical_s.values())
        return sum(known) / len(known) if known else None


def slots_of(described: dict[str, Any], fallback: int) -> int:
    """Worker slots from a dispatcher's ``describe()``: its own, or its live workers'."""
    if isinstance(described.get("slots"), int):
        return max(1, int(described["slots"]))
    workers = described.get("workers")
    if isinstance(workers, list) and workers:
        return max(1, sum(int(w.get("concurrency") or 1) for w in workers))
    return max(1, fallback)


def take_snapshot(
    store: JobStore, types: Iterable[str], slots: int, now: float | None = None
) -> QueueSnapshot:
    """Read what the estimates need (a few small reads, none over the queued jobs)."""
    now = time.time() if now is None else now
    typical = {}
    for job_type in sorted(set(types)):
        seconds = store.recent_duration_s(job_type)
        if seconds is not None:
            typical[job_type] = seconds
    running = store.running()
    for job in running:
        if job.type not in typical:
            seconds = store.recent_duration_s(job.type)
            if seconds is not None:
                typical[job.type] = seconds
    snapshot = QueueSnapshot(time.monotonic(), slots, [], typical)
    ends = [expected_end(job, snapshot) for job in running]
    known = sorted(max(end, now) for end in ends if end is not None)
    unknown: list[float | None] = [None] * (len(ends) - len(known))
    free: list[float | None] = [now] * max(slots - len(ends), 0)
    snapshot.free_at = (free + list(known) + unknown)[:slots] or [now]
    return snapshot


def expected_end(job: JobRecord, snapshot: QueueSnapshot) -> float | None:
    """A running job's expected end: its own estimate, else its start plus its type's run time."""
    if job.eta_at is not None:
        return job.eta_at
    typical = snapshot.typical_s.get(job.type)
    if typical is None or job.started_at is None:
        return None
    return job.started_at + typical


def apply(jobs: Iterable[JobRecord], snapshot: QueueSnapshot, now: float | None = None) -> None:
    """Fill ``estimated_start_at`` of queued jobs and a missing ``eta_at`` of running ones.

    A queued job with ``n`` jobs ahead starts when the ``n``-th slot to come free does, one
    round of the typical run time later for each full round of slots before it.
    """
    now = time.time() if now is None else now
    for job in jobs:
        if job.status == "running" and job.eta_at is None:
            job.eta_at = expected_end(job, snapshot)
        elif job.status == "queued" and job.queue_position is not None:
            ahead = job.queue_position - 1
            rounds, slot = divmod(ahead, snapshot.slots)
            free = snapshot.free_at[slot] if slot < len(snapshot.free_at) else None
            if free is None:
                free = now + (snapshot.typical(job.type) or 0.0) if snapshot.typical_s else None
            typical = snapshot.typical(job.type)
            if free is None or (rounds and typical is None):
                continue
            job.estimated_start_at = round(max(free, now) + rounds * (typical or 0.0), 3)


class QueueClock:
    """A snapshot kept for ``MAX_AGE_S``, taken again when older (``refresh`` off the loop)."""

    def __init__(self, take: Callable[[], QueueSnapshot]) -> None:
        self._take = take
        self.snapshot: QueueSnapshot | None = None

    def stale(self) -> bool:
        return self.snapshot is None or time.monotonic() - self.snapshot.at > MAX_AGE_S

    def refresh(self) -> QueueSnapshot:
        self.snapshot = self._take()
        return self.snapshot
