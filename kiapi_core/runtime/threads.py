"""The embedded dispatcher: one thread per model slot runs queued jobs from the store.

Model work stays on these threads (MLX prefers one thread; memory is the limit), never on the
event loop. A watchdog fails jobs that run past KIAPI_JOB_TIMEOUT_S without reporting progress,
and ends ``canceled`` those that ignore their cancel for KIAPI_CANCEL_GRACE_S, giving their
slot a fresh thread, so one hung handler cannot stall the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kiapi_core.files.store import FileStore
from kiapi_core.jobs.context import (
    JobContext,
    JobHandler,
)
from kiapi_core.jobs.events import JobEvents
from kiapi_core.jobs.previews import PreviewSink
from kiapi_core.jobs.status import ErrorKind, JobStatus
from kiapi_core.jobs.store import (
    JobRecord,
    JobStore,
)
from kiapi_core.models.manager import JobUse, ModelManager, job_scope
from kiapi_core.models.routing import LOAD_JOB, route_keys_of
from kiapi_core.runtime.execute import Outcome, perform
from kiapi_core.runtime.malloc import give_back_free_memory, tune_for_models
from kiapi_core.runtime.priority import lower_thread_priority
from kiapi_core.runtime.rss import rss_mb
from kiapi_core.settings import Settings
from kiapi_core.state.diskfull import DISK_FULL_ERROR, is_disk_full

log = logging.getLogger("kiapi.worker")

# How a runtime records a job's end: (job, worker, outcome, artifacts) -> still ours.
Ending = Callable[[JobRecord, str, Outcome, list[str]], bool]

# A cooperative handler notices the deadline at its next progress report; the watchdog only
# steps in after this grace period.
WATCHDOG_GRACE_S = 5.0
# Recording a job's end on a full disk is retried after a pause that doubles up to this.
DISK_FULL_RETRY_MAX_S = 10.0


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
        abandon_canceled: bool = True,
        is_canceled: Callable[[str], bool] | None = None,
        end: Ending | None = None,
        plugin_of: Mapping[str, str] | None = None,
        previews: PreviewSink | None = None,
    ) -> None:
        self.store = store
        self.files = files
        self.models = models
        self.settings = settings
        # The registry's own mapping (not a copy): a plugin withdrawn after a failed startup
        # runs nothing more here either.
        self.handlers = handlers
        self.plugin_of = dict(plugin_of or {})
        self.events = events
        self.previews = previews  # where handlers' live previews go (None: dropped)
        self.maintenance = maintenance
        self.name_prefix = name_prefix
        # False when the whole process already runs at the worker's priority.
        self.renice = renice
        # False in the worker process, whose server restarts it instead.
        self.abandon_canceled = abandon_canceled
        # Where a runtime decides for itself: what counts as a cancel (celery: a lost lease
        # too) and how a job ends (celery: a job handed back goes to its queue, not failed).
        self._is_canceled = is_canceled or store.cancel_requested
        self._end: Ending = end or self.record
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._slots: dict[int, str] = {}
        self._threads: list[threading.Thread] = []
        self._generation = 0
        self._running = 0
        self._idle_since = time.monotonic()
        self._heap_given_back = True  # nothing kept before the first job
        self._progress_lost: set[str] = set()  # jobs whose progress a full disk dropped
        # Before any slot thread (or the BLAS/MLX threads they start) allocates.
        tune_for_models()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        for slot in range(self.settings.workers):
            self._spawn(slot)
        if self.settings.job_timeout_s > 0 or self.abandon_canceled:
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
        return {"mode": "thread", "slots": self.settings.workers, "rss_mb": rss_mb()}

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
        # Every queued job is claimed, whatever its type: one this pool has no handler for (its
        # plugin failed to load here but not in the server) fails at once naming the type,
        # instead of waiting in the queue forever.
        types = None
        while not self._stopping.is_set() and self._owns(slot, name):
            self._wake.clear()
            try:
                job = self._claim(name, types)
            except Exception as exc:
                if is_disk_full(exc):
                    # The job stays queued (the claim rolled back) until there is room.
                    log.warning("claiming a job failed: the disk is full; retrying")
                    self._stopping.wait(5.0)
                else:
                    log.exception("claiming a job failed; retrying")
                    self._stopping.wait(1.0)
                continue
            if job is None:
                self._wake.wait(min(self.settings.sweep_interval_s, 5.0))
                self._idle_maintenance()
                continue
            # Another slot may be free to take the next queued job.
            self._wake.set()
            self.events.publish(job.id)
            self.events.publish_queue_moved()
            try:
                self.execute(job, name)
            except Exception:
                # A slot thread that died would never be replaced: log it and take the next.
                log.exception("running job %s failed outside its handler", job.id)
            finally:
                with self._lock:
                    self._running -= 1
                    self._idle_since = time.monotonic()
                    self._heap_given_back = False
            self._idle_maintenance()  # between jobs too: the worker may want recycling

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
            self._give_back_kept_heap()
            if self.maintenance is not None:
                self.maintenance()
        except Exception:
            log.exception("worker maintenance failed")

    def _give_back_kept_heap(self) -> None:
        # Buffers malloc keeps for the next job (runtime/malloc.py) go back to the system once
        # no job ran for KIAPI_WORKER_HEAP_IDLE_S: back-to-back jobs reuse them, an idle worker
        # holds only its models.
        with self._lock:
            due = (
                not self._heap_given_back
                and not self._running
                and time.monotonic() - self._idle_since >= self.settings.worker_heap_idle_s
            )
            if due:
                self._heap_given_back = True
        if due:
            give_back_free_memory()

    def _report(
        self, job_id: str, fraction: float | None, label: str | None, eta_at: float | None = None
    ) -> None:
        try:
            self.store.set_progress(job_id, fraction, label, eta_at)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            # Progress is only a hint: the job goes on, and its end is what must be recorded.
            if job_id not in self._progress_lost:
                self._progress_lost.add(job_id)
                log.warning("job %s: progress not recorded, the disk is full", job_id)
            return
        self.events.publish(job_id)

    def idle_for(self) -> float:
        """Seconds since the last job ended (or the pool started); 0 while one runs."""
        with self._lock:
            return 0.0 if self._running else time.monotonic() - self._idle_since

    def execute(self, job: JobRecord, worker: str) -> None:
        """Run a job this worker has claimed, on the calling thread, and record its end.

        Also the body of a ``kiapi worker``'s Celery task (kiapi_core/runtime/celery/worker.py).
        """
        timeout = self.settings.job_timeout_s
        try:
            typical = self.store.recent_duration_s(job.type)
        except Exception:
            typical = None  # only the ETA's first guess: the job runs without it
        ctx = JobContext(
            job_id=job.id,
            type=job.type,
            params=job.params,
            files=self.files,
            models=self.models,
            settings=self.settings,
            report=self._report,
            is_canceled=self._is_canceled,
            deadline=time.monotonic() + timeout if timeout > 0 else None,
            cancel_at=job.deadline,
            is_stopping=self._stopping.is_set,
            attempt=job.attempt,
            plugin=self.plugin_of.get(job.type, job.type),
            typical_s=typical,
            previews=self.previews,
        )
        started = time.monotonic()
        use = JobUse(
            job.keep_alive_s, route_keys_of(job.type, job.params), timed=job.type != LOAD_JOB
        )
        with job_scope(use):
            outcome = perform(job, self.handlers.get(job.type), ctx, self.settings.max_result_bytes)
        self._progress_lost.discard(job.id)
        self._drop_preview(job.id)
        owned = self._end(job, worker, outcome, ctx.artifacts)
        status = outcome.status
        if not owned or status != "succeeded":
            try:
                self.files.delete_many(ctx.artifacts)
            except Exception:
                log.exception("deleting the files of job %s failed", job.id)
        if not owned:
            log.warning(
                "job %s was taken from %s (timeout or restart); its output was dropped",
                job.id,
                worker,
            )
        log.info("job %s (%s) %s in %.2fs", job.id, job.type, status, time.monotonic() - started)
        self.events.publish(job.id)

    def _drop_preview(self, job_id: str) -> None:
        # Before the end is recorded: a client that saw the job end finds no stale preview.
        if self.previews is None:
            return
        try:
            self.previews.drop(job_id)
        except Exception:
            log.exception("dropping the preview of job %s failed", job_id)

    def record(self, job: JobRecord, worker: str, outcome: Outcome, artifacts: list[str]) -> bool:
        """Write ``outcome`` as the job's end; False when the job is no longer this worker's
        (its output must then go). The default ending; a runtime may pass its own (``end``)."""
        try:
            return self.store.finish(
                job.id,
                outcome.status,
                worker=worker,
                result=outcome.stored_result,
                artifacts=artifacts if outcome.status == JobStatus.succeeded else [],
                error=outcome.error,
                error_kind=outcome.kind,
                error_status=outcome.http_status,
            )
        except Exception as exc:
            if is_disk_full(exc):
                outcome.fail(ErrorKind.disk_full, DISK_FULL_ERROR)
                return self._finish_disk_full(job.id, worker, artifacts)
            log.exception("recording the end of job %s failed", job.id)
            return False

    def _finish_disk_full(self, job_id: str, worker: str, artifacts: list[str]) -> bool:
        """Record a job whose end a full disk refused as failed, "disk full", once it fits.

        Its output is dropped first (that frees space). Retried with backoff for as long as
        this worker runs: stopped, the job is left to the supervisor or to start-up recovery.
        """
        log.error("recording the end of job %s failed: the disk is full; it ends failed", job_id)
        try:
            self.files.delete_many(artifacts)
        except Exception:
            log.exception("deleting the files of job %s failed", job_id)
        delay = 0.5
        while True:
            try:
                return self.store.finish(
                    job_id, "failed", worker=worker, error=DISK_FULL_ERROR, error_kind="disk_full"
                )
            except Exception as exc:
                if not is_disk_full(exc):
                    log.exception("recording the end of job %s failed", job_id)
                    return False
            if self._stopping.wait(delay):
                log.error("job %s: stopping with its end unrecorded (disk full)", job_id)
                return False
            delay = min(delay * 2, DISK_FULL_RETRY_MAX_S)

    # -- watchdog --------------------------------------------------------------------------
    def _watchdog(self) -> None:
        limit = self.settings.job_timeout_s
        grace = self.settings.cancel_grace_s
        cancel_seen: dict[str, float] = {}  # job id -> when its cancel was first seen
        while not self._stopping.wait(1.0):
            now = time.time()
            try:
                running = self.store.running()
            except Exception:
                log.exception("watchdog could not read running jobs")
                continue
            mono = time.monotonic()
            cancel_seen = {
                j.id: cancel_seen.get(j.id, mono)
                for j in running
                if j.cancel_requested and self.abandon_canceled
            }
            for job in running:
                slot = self._slot_of(job.worker)
                if slot is None or job.started_at is None:
                    continue
                if job.id in cancel_seen and mono - cancel_seen[job.id] >= grace:
                    try:
                        self._abandon_canceled(job, slot, grace)
                    except Exception:
                        # This thread must live on (a full disk, a store outage): next round.
                        log.exception("watchdog could not end canceled job %s", job.id)
                    continue
                if limit <= 0 or now - job.started_at <= limit + WATCHDOG_GRACE_S:
                    continue
                try:
                    abandoned = self.store.finish(
                        job.id,
                        "failed",
                        worker=job.worker,
                        error=f"job exceeded KIAPI_JOB_TIMEOUT_S={limit:g} and was abandoned",
                        error_kind="timeout",
                    )
                except Exception:
                    # This thread must live on (a full disk, a store outage): next round.
                    log.exception("watchdog could not fail job %s", job.id)
                    continue
                if abandoned:
                    log.error("job %s hung past its limit; replacing worker %s", job.id, job.worker)
                    self.events.publish(job.id)
                    self._spawn(slot)

    def _abandon_canceled(self, job: JobRecord, slot: int, grace: float) -> None:
        # Its thread cannot be stopped: it runs on, and what it finishes with is dropped.
        if self.store.finish(
            job.id,
            "canceled",
            worker=job.worker,
            error=f"canceled by request (the handler did not stop within"
            f" KIAPI_CANCEL_GRACE_S={grace:g}s and was abandoned)",
            error_kind="canceled",
        ):
            self.files.delete_for_job(job.id)
            log.error("job %s ignored its cancel; replacing worker %s", job.id, job.worker)
            self.events.publish(job.id)
            self._spawn(slot)

    def _slot_of(self, worker: str | None) -> int | None:
        with self._lock:
            for slot, name in self._slots.items():
                if name == worker:
                    return slot
        return None
