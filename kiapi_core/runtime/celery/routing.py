"""Residency-aware routing on the celery backend (Ray Serve's model multiplexing, simplified).

Every ``kiapi worker`` advertises, in its worker-directory entry (refreshed with its heartbeat
and at once after each load or unload), the models it holds: their keys, ``in_use`` counts and
the routing keys of the jobs they served (``kiapi_core/models/routing.py``). It consumes its own
queue (``kiapi.w.<node>``) besides the shared queues of its job types.

An API node reads the directory on a thread of its own (``ClusterModels``, every
``REFRESH_S``) and, for each job, picks a live worker that holds the job's model (the least busy
one when several do) and sends the message to that worker's queue; otherwise to the shared
queue of the job type, where any capable worker takes it. When every holder is busy and another
capable worker is free, the job goes to the shared queue if loading the model there starts it
sooner than the holder's backlog would (the load and use times each worker advertises). A
``kiapi.load`` job goes to a worker already holding the model, else the capable worker holding
the fewest models.

A routed job leaves its type's turns (the Redis claim takes the first queued job of a type for
any message of the type's queue, for priorities): its message, from the worker's own queue,
claims exactly that job. If that worker dies first, the sweeper finds the job still queued in
``P:routed`` with its worker gone from the directory, makes it a turn of the shared queue again
and sends it there (a duplicate message is harmless: the claim decides).

``ClusterModels`` is also the API node's ``ModelsView``: ``/v1/models`` and ``/health`` show
what the workers hold, and an unload is a ``P:control`` message every worker listens to.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

import redis

from kiapi_core.jobs.store import JobRecord
from kiapi_core.models.routing import LOAD_JOB, held_by, model_id, route_key
from kiapi_core.state.redis import WorkerDirectory

log = logging.getLogger("kiapi.celery")

REFRESH_S = 0.25


def worker_queue(node: str) -> str:
    return f"kiapi.w.{node}"


def control_channel(prefix: str) -> str:
    return f"{prefix}:control"


def _load(worker: dict[str, Any], backlog: dict[str, int]) -> int:
    """Jobs it runs plus those routed to it and not started yet."""
    return int(worker.get("running") or 0) + backlog.get(str(worker.get("node")), 0)


def _slots(worker: dict[str, Any]) -> int:
    return max(1, int(worker.get("concurrency") or 1))


def loading_pays(holder: dict[str, Any], key: str, backlog: dict[str, int]) -> bool:
    """Whether a job of ``key`` starts sooner loading its model on a free worker than waiting
    for a slot of ``holder``, the least loaded worker holding it (False while it has one free).

    The wait: the jobs ahead of it there times the model's typical use on that worker; the
    load: how long the model took to load there. A load of seconds is worth it behind a long
    backlog, never for one short job; unknown use times (no use ended yet) keep the holder.
    """
    ahead = _load(holder, backlog) - _slots(holder) + 1
    rows = [r for r in holder.get("resident") or [] if held_by(key, r.get("route_keys") or [])]
    if ahead <= 0 or not rows or rows[0].get("run_s") is None:
        return False
    wait = ahead * float(rows[0]["run_s"]) / _slots(holder)
    return float(rows[0].get("load_s") or 0.0) < wait


def choose_worker(
    job: JobRecord, live: Iterable[dict[str, Any]], backlog: dict[str, int]
) -> str | None:
    """The node whose own queue ``job`` goes to, or None for the shared queue.

    Only when some capable worker lacks the model (else no choice avoids a load, and the
    shared queue keeps the global priority order): the least loaded holder, busy or not,
    unless the holders are all busy, another capable worker has a free slot and loading the
    model there starts the job sooner (``loading_pays``): then the shared queue, which that
    free worker takes.
    """
    workers = [w for w in live if w.get("queue") and job.type in (w.get("types") or [])]
    if job.type == LOAD_JOB:
        model = str(job.params.get("model"))
        holders = [w for w in workers if any(model_id(r) == model for r in w.get("resident") or [])]
        capable = [w for w in workers if model in (w.get("serves_models") or [])]
        pool = holders or capable
        if not pool:
            return None
        best = min(pool, key=lambda w: (len(w.get("resident") or []), _load(w, backlog)))
        return str(best["node"])
    key = route_key(job.type, job.params)
    holders = [
        w
        for w in workers
        if any(held_by(key, r.get("route_keys") or []) for r in w.get("resident") or [])
    ]
    if not holders or len(holders) == len(workers):
        return None  # a load nowhere or everywhere: the shared queue keeps global priority
    # The least loaded holder even when it is busy: a model load (tens of GB, seconds to
    # minutes) mostly costs more than waiting for a slot, and a routing that depended on which
    # slot looked free a moment ago (the view is a fraction of a second old) would load at
    # random; the measured costs decide when the holders are all busy and a worker is free.
    best = min(holders, key=lambda w: _load(w, backlog))
    if loading_pays(best, key, backlog) and any(
        w not in holders and _load(w, backlog) < _slots(w) for w in workers
    ):
        return None
    return str(best["node"])


class ClusterModels:
    """What the live ``kiapi worker``s hold, refreshed off the event loop (a ``ModelsView``)."""

    def __init__(self, client: redis.Redis, prefix: str, directory: WorkerDirectory) -> None:
        self.r = client
        self.prefix = prefix
        self.directory = directory
        self._lock = threading.Lock()
        self._live: list[dict[str, Any]] = []
        self._backlog: dict[str, int] = {}
        self._ok = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="kiapi-residency", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(REFRESH_S):
            self.refresh()

    def refresh(self) -> None:
        try:
            live, raw = self.directory.live_with(f"{self.prefix}:backlog")
            backlog = {k: int(v) for k, v in raw.items()}
        except (redis.RedisError, ValueError) as exc:
            log.warning("reading the worker directory failed (%s)", exc)
            with self._lock:
                self._ok = False
            return
        with self._lock:
            self._live, self._backlog, self._ok = live, backlog, True

    def backlog(self) -> dict[str, int]:
        with self._lock:
            return dict(self._backlog)

    def routed_to(self, node: str) -> None:
        """Count a job just routed to ``node`` until the next read shows it."""
        with self._lock:
            self._backlog[node] = self._backlog.get(node, 0) + 1

    def live(self) -> list[dict[str, Any]] | None:
        """The workers as last read; None when Redis did not answer."""
        with self._lock:
            return list(self._live) if self._ok else None

    # -- ModelsView ------------------------------------------------------------------------
    @property
    def load_counts(self) -> Counter[str]:
        return self._counts("load_counts")

    @property
    def transient_counts(self) -> Counter[str]:
        return self._counts("transient_counts")

    def _counts(self, kind: str) -> Counter[str]:
        total: Counter[str] = Counter()
        for w in self.live() or []:
            total.update({k: int(n) for k, n in (w.get(kind) or {}).items()})
        return total

    def summary(self) -> dict[str, float]:
        live = self.live() or []
        sums = {"resident": 0.0, "transient": 0.0, "loading": 0.0, "memory_gb_used": 0.0}
        limit = 0.0
        for w in live:
            s = w.get("summary") or {}
            for k in sums:
                sums[k] += float(s.get(k) or 0)
            limit += float(s.get("memory_gb_limit") or 0)
        return {
            **sums,
            "memory_gb_used": round(sums["memory_gb_used"], 3),
            "memory_gb_limit": limit,
        }

    def status(self) -> list[dict[str, Any]]:
        return [
            {**row, "node": w.get("node")}
            for w in self.live() or []
            for row in w.get("resident") or []
        ]

    def unload_all(self) -> None:
        """The workers' models are theirs: an API node stopping leaves them."""

    def request_unload(self, model: str) -> None:
        self.r.publish(control_channel(self.prefix), json.dumps({"op": "unload", "model": model}))
        # The answer polls this view: read again now rather than at the next tick.
        for _ in range(40):
            if self._stop.wait(0.05):
                return
            self.refresh()
            if not any(model_id(row) == model for row in self.status()):
                return
