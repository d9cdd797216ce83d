"""The embedded dispatcher: one thread per model slot runs queued jobs from the store.

Model work stays on these threads (MLX prefers one thread; memory is the limit), never on the
event loop. A watchdog fails jobs that run past KIAPI_JOB_TIMEOUT_S without reporting progress
and gives their slot a fresh thread, so one hung handler cannot stall the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kiapi_core.files.store import FileStore
from kiapi_core.jobs.context import (
    JobCanceled,
    JobContext,
    JobHandler,
    JobInterrupted,
    JobTimedOut,
)
from kiapi_core.jobs.errors import JobInputError
from kiapi_core.jobs.events import JobEvents
from kiapi_core.jobs.store import (
    DAMAGED_ERROR,
    DamagedRecord,
    JobRecord,
    JobStore,
    NotStrictJson,
    strict_dumps,
)
from kiapi_core.malloc import use_one_arena
from kiapi_core.models.manager import ModelManager, ModelUnavailable
from kiapi_core.priority import lower_thread_priority
from kiapi_core.settings import Settings

log = logging.getLogger("kiapi.worker")

# A cooperative handler notices the deadline at its next progress report; the watchdog only
# steps in after this grace period.
WATCHDOG_GRACE_S = 5.0


class WorkerPool:
    def __init__(
        self,
        *,
        store: JobStore,
        files: FileStore,
        models: ModelManager,
        settings: Settings,
        handlers: Mapping[str, JobHandler],
        events: JobEvents,
        maintenance: Callable[[], None] | None = None,
        name_prefix: str = "kiapi-worker-",
        renice: bool = True,
    ) -> None:
        self.store = store
        self.files = files
        self.models = models
        self.settings = settings
        self.handlers = dict(handlers)
        self.events = events
        self.maintenance = maintenance
        self.name_prefix = name_prefix
        # False when the whole process already runs at the worker's priority.
        self.renice = renice
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._slots: dict[int, str] = {}
        self._threads: list[threading.Thread] = []
        self._generation = 0
        self._running = 0
        self._idle_since = time.monotonic()
        # Before any slot thread (or the BLAS/MLX threads they start) allocates.
        use_one_arena()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        for slot in range(self.settings.workers):
            self._spawn(slot)
        if self.settings.job_timeout_s > 0:
            threading.Thread(target=self._watchdog, name="kiapi-watchdog", daemon=True).start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; a running job stops at its next progress report and ends failed."""
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def dispatch(self, job: JobRecord) -> None:
        self.wake()

    def describe(self) -> dict[str, Any]:
        return {"mode": "thread", "slots": self.settings.workers}

    def wake(self) -> None:
        """Look for queued jobs now (one was queued, or a slot came free)."""
        self._wake.set()

    def _spawn(self, slot: int) -> None:
        with self._lock:
            self._generation += 1
            name = f"{self.name_prefix}{slot}.{self._generation}"
            self._slots[slot] = name
        thread = threading.Thread(target=self._loop, args=(slot, name), name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _owns(self, slot: int, name: str) -> bool:
        with self._lock:
            return self._slots.get(slot) == name

    # -- the loop --------------------------------------------------------------------------
    def _loop(self, slot: int, name: str) -> None:
        if self.renice:
            # Nice only: a SCHED_IDLE thread holding the GIL would starve this process's
            # other threads (the event loop) whenever the machine is busy.
            lower_thread_priority(self.settings.worker_nice)
        types = frozenset(self.handlers) or None
        while not self._stopping.is_set() and self._owns(slot, name):
            self._wake.clear()
            try:
                job = self._claim(name, types)
            except Exception:
                log.exception("claiming a job failed; retrying")
                self._stopping.wait(1.0)
                continue
            if job is None:
                self._wake.wait(min(self.settings.sweep_interval_s, 5.0))
                self._idle_maintenance()
                continue
            # Another slot may be free to take the next queued job.
            self._wake.set()
            self.events.publish(job.id, job)
            self.events.publish_queue_moved()
            try:
                self.execute(job, name)
            finally:
                with self._lock:
                    self._running -= 1
                    self._idle_since = time.monotonic()

    def _claim(self, name: str, types: frozenset[str] | None) -> JobRecord | None:
        # Under the lock, so stop_if_idle never sees "idle" while a slot is taking a job.
        with self._lock:
            if self._stopping.is_set():
                return None
            job = self.store.claim_next(name, types)
            if job is not None:
                self._running += 1
            return job

    def stop_if_idle(self, idle_s: float) -> bool:
        """Stop taking jobs if none ran for ``idle_s`` seconds (and none runs); True if so."""
        with self._lock:
            if self._running or time.monotonic() - self._idle_since < idle_s:
                return False
            self._stopping.set()
        self._wake.set()
        return True

    def _idle_maintenance(self) -> None:
        try:
            self.models.sweep_idle()
            if self.maintenance is not None:
                self.maintenance()
        except Exception:
            log.exception("worker maintenance failed")

    def _publish(self, job_id: str) -> None:
        """Wake followers; when someone follows the job, send the new state along."""
        snapshot = None
        if self.events.watched(job_id):
            try:
                snapshot = self.store.get(job_id)
            except Exception:
                log.exception("reading job %s for its followers failed", job_id)
        self.events.publish(job_id, snapshot)

    def _report(self, job_id: str, fraction: float | None, label: str | None) -> None:
        self.store.set_progress(job_id, fraction, label)
        self._publish(job_id)

    def idle_for(self) -> float:
        """Seconds since the last job ended (or the pool started); 0 while one runs."""
        with self._lock:
            return 0.0 if self._running else time.monotonic() - self._idle_since

    def execute(self, job: JobRecord, worker: str) -> None:
        """Run a job this worker has claimed, on the calling thread, and record its end.

        Also the body of a ``kiapi worker``'s Celery task (kiapi_core/backends/worker.py).
        """
        timeout = self.settings.job_timeout_s
        ctx = JobContext(
            job_id=job.id,
            type=job.type,
            params=job.params,
            files=self.files,
            models=self.models,
            settings=self.settings,
            report=self._report,
            is_canceled=self.store.cancel_requested,
            deadline=time.monotonic() + timeout if timeout > 0 else None,
            is_stopping=self._stopping.is_set,
            attempt=job.attempt,
        )
        status, result, error, kind = "failed", None, None, None
        handler = self.handlers.get(job.type)
        started = time.monotonic()
        try:
            if job.damage is not None:
                raise DamagedRecord(f"{DAMAGED_ERROR} ({job.damage}); it cannot run")
            if handler is None:
                raise LookupError(
                    f"no handler for job type {job.type!r}: is its plugin installed and enabled?"
                )
            result = handler(ctx)
            if not isinstance(result, dict):
                raise TypeError(
                    f"handler for {job.type!r} returned {type(result).__name__}, not dict"
                )
            # Fail here, clearly, rather than in the store or in every answer that shows it.
            strict_dumps(result, f"the result of the {job.type!r} handler")
            status = "succeeded"
        except JobTimedOut as exc:
            error, kind = str(exc), "timeout"
        except JobInterrupted as exc:
            error, kind = str(exc), "interrupted"
        except JobCanceled:
            status, error, kind = "canceled", "canceled by request", "canceled"
        except JobInputError as exc:
            error, kind = str(exc), "invalid_input"
            result = {"detail": exc.detail}
        except ModelUnavailable as exc:
            error, kind = str(exc), "unavailable"
        except BaseException as exc:
            # BaseException too: a handler calling sys.exit() must not kill this worker
            # thread and leave its job "running" forever.
            log.exception("job %s (%s) failed", job.id, job.type)
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            kind = "internal"
        if kind == "invalid_input":
            try:
                strict_dumps(result, "the detail of its JobInputError")
            except NotStrictJson as exc:
                error, result = f"{error}; {exc}", None
        owned = False
        try:
            owned = self.store.finish(
                job.id,
                status,
                worker=worker,
                result=result if status == "succeeded" or kind == "invalid_input" else None,
                artifacts=ctx.artifacts if status == "succeeded" else [],
                error=error,
                error_kind=kind,
            )
        except Exception:
            log.exception("recording the end of job %s failed", job.id)
        if not owned or status != "succeeded":
            self.files.delete_many(ctx.artifacts)
        if not owned:
            log.warning(
                "job %s was taken from %s (timeout or restart); its output was dropped",
                job.id,
                worker,
            )
        log.info("job %s (%s) %s in %.2fs", job.id, job.type, status, time.monotonic() - started)
        self._publish(job.id)

    # -- watchdog --------------------------------------------------------------------------
    def _watchdog(self) -> None:
        limit = self.settings.job_timeout_s
        while not self._stopping.wait(1.0):
            now = time.time()
            try:
                running = self.store.running()
            except Exception:
                log.exception("watchdog could not read running jobs")
                continue
            for job in running:
                slot = self._slot_of(job.worker)
                if slot is None or job.started_at is None:
                    continue
                if now - job.started_at <= limit + WATCHDOG_GRACE_S:
                    continue
                if self.store.finish(
                    job.id,
                    "failed",
                    worker=job.worker,
                    error=f"job exceeded KIAPI_JOB_TIMEOUT_S={limit:g} and was abandoned",
                    error_kind="timeout",
                ):
                    log.error("job %s hung past its limit; replacing worker %s", job.id, job.worker)
                    self._publish(job.id)
                    self._spawn(slot)

    def _slot_of(self, worker: str | None) -> int | None:
        with self._lock:
            for slot, name in self._slots.items():
                if name == worker:
                    return slot
        return None
