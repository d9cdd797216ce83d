"""What routes use to submit, read, cancel and follow jobs, whatever backend runs them."""

from __future__ import annotations

import asyncio
import builtins
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, Protocol, TypeVar, runtime_checkable

from kiapi_core.files.store import FileStore
from kiapi_core.jobs import eta
from kiapi_core.jobs.events import JobEvents
from kiapi_core.jobs.fanout import EventHub
from kiapi_core.jobs.previews import Preview, PreviewStore
from kiapi_core.jobs.store import IdempotencyKey, JobRecord, JobStore
from kiapi_core.webhooks.spec import WebhookSpec

log = logging.getLogger("kiapi.jobs")
P = ParamSpec("P")
T = TypeVar("T")


class StoreCall(Protocol):
    """How the event loop calls a store: the embedded backend's ``Database.call`` moves a call
    that finds the database locked off the loop; a store over the network (Redis) is called on
    a thread every time (``call_in_thread``); ``call_inline`` is for tests and in-memory stores.
    """

    def __call__(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Awaitable[T]: ...


async def call_inline(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    return fn(*args, **kwargs)


_store_threads: ThreadPoolExecutor | None = None


async def call_in_thread(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """A store over the network (Redis, and the broker behind it): every call on a thread, so
    a stalled server holds up only the requests that need it, never the event loop."""
    global _store_threads
    if _store_threads is None:
        _store_threads = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kiapi-store")
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_store_threads, functools.partial(fn, *args, **kwargs))


class NoHandler(LookupError):
    """No loaded plugin handles this job type (its plugin is not installed, enabled or loaded)."""


@runtime_checkable
class Dispatcher(Protocol):
    """Gets queued jobs to a worker: the in-process pool, or a distributed queue."""

    def start(self) -> None: ...
    def stop(self, timeout: float = 5.0) -> None: ...
    def dispatch(self, job: JobRecord) -> None: ...
    def describe(self) -> dict[str, Any]:
        """How this node runs jobs, for ``GET /health`` (``mode`` and details)."""
        ...


class JobService:
    def __init__(
        self,
        store: JobStore,
        dispatcher: Dispatcher,
        events: JobEvents,
        files: FileStore,
        *,
        max_queue: int,
        workers: int,
        call: StoreCall = call_inline,
        handled: frozenset[str] | None = None,
        unhandled_error: Callable[[str], str] = lambda t: f"no plugin handles job type {t!r}",
        owns_queue: bool = True,
        previews: PreviewStore | None = None,
        keepalive_s: float = 15.0,
    ) -> None:
        # The job types this node's loaded plugins handle (None: any); the API node knows
        # them from its own registry in every backend, the celery one included.
        self.handled = handled
        self.unhandled_error = unhandled_error
        self.owns_queue = owns_queue
        self.previews = previews
        self.call = call
        self.store = store
        self.dispatcher = dispatcher
        self.events = events
        self.files = files
        self.max_queue = max_queue
        self.workers = workers
        # One per node: every SSE stream's changes come from it (jobs/fanout.py).
        self.hub = EventHub(store, call, events, keepalive_s=keepalive_s)
        self.queue_clock = eta.QueueClock(
            lambda: eta.take_snapshot(
                store, handled or (), eta.slots_of(dispatcher.describe(), workers)
            )
        )

    async def estimate(self, jobs: builtins.list[JobRecord]) -> None:
        """Fill the ETA fields of queued and running ``jobs`` (docs/jobs.md, "ETA")."""
        live = [j for j in jobs if j.status in ("queued", "running")]
        if not live:
            return
        snapshot = self.queue_clock.snapshot
        if self.queue_clock.stale():
            try:
                snapshot = await self.call(self.queue_clock.refresh)
            except Exception:
                # Only an estimate: an answer goes out without it rather than fail.
                log.exception("reading the queue for ETAs failed")
        if snapshot is not None:
            eta.apply(live, snapshot)

    def recover(self) -> list[str]:
        """Fail jobs a previous process left running, and drop any file they had saved; fail
        the queued jobs no loaded plugin handles (they would wait forever)."""
        interrupted = self.store.recover()
        for job_id in interrupted:
            self.files.delete_for_job(job_id)
        # Only where this node is the only one that runs jobs: with a shared store (celery),
        # another node's workers may well run a type this node's plugins lack.
        if self.handled is not None and self.owns_queue:
            try:
                failed = self.store.fail_unhandled(self.handled, self.unhandled_error)
            except Exception:
                # A shared store down at start (celery): the node starts all the same, and
                # those jobs are failed at the next start.
                log.exception("failing the queued jobs no loaded plugin handles failed")
                failed = []
            for job_id in failed:
                log.error("job %s failed: %s", job_id, "no loaded plugin handles its type")
                self.events.publish(job_id)
        return interrupted

    async def submit(
        self,
        job_type: str,
        params: dict[str, Any],
        *,
        artifact_type: str | None = None,
        priority: int = 0,
        cancel_after_s: float | None = None,
        idempotency: IdempotencyKey | None = None,
        retry_of: str | None = None,
        webhook: WebhookSpec | None = None,
        keep_alive_s: float | None = None,
    ) -> JobRecord:
        """A new job, dispatched; or the one ``idempotency``'s key created (``replayed``).

        ``artifact_type``: it must save exactly one file of this media type (a route answering
        with the file itself), or it fails. NoHandler when no loaded plugin runs ``job_type``."""
        if self.handled is not None and job_type not in self.handled:
            raise NoHandler(self.unhandled_error(job_type))
        job: JobRecord = await self.call(
            self.store.create,
            job_type,
            params,
            self.max_queue,
            artifact_type=artifact_type,
            priority=priority,
            cancel_after_s=cancel_after_s,
            idempotency=idempotency,
            retry_of=retry_of,
            webhook=webhook.to_json() if webhook is not None else None,
            keep_alive_s=keep_alive_s,
        )
        if not job.replayed:
            # The celery dispatcher talks to the broker: off the loop like any store call.
            await self.call(self.dispatcher.dispatch, job)
        if retry_of is not None:
            self.events.publish(retry_of)
        await self.estimate([job])
        return job

    async def set_priority(self, job_id: str, priority: int) -> JobRecord | None:
        job: JobRecord | None = await self.call(self.store.set_priority, job_id, priority)
        if job is not None and job.status == "queued":
            self.events.publish(job_id)
            self.events.publish_queue_moved()
            await self.estimate([job])
        return job

    async def forget_idempotency(self, keys: builtins.list[str]) -> None:
        await self.call(self.store.forget_idempotency, keys)

    async def expire_deadlines(self) -> builtins.list[str]:
        """Cancel the queued jobs whose deadline passed, and wake whoever waits on them."""
        expired: builtins.list[str] = await self.call(self.store.expire_deadlines)
        for job_id in expired:
            self.events.publish(job_id)
        if expired:
            self.events.publish_queue_moved()
        return expired

    async def get(self, job_id: str) -> JobRecord | None:
        job: JobRecord | None = await self.call(self.store.get, job_id)
        due = (
            job is not None and job.status == "queued" and (job.deadline or math.inf) <= time.time()
        )
        if due and job_id in await self.expire_deadlines():
            job = await self.call(self.store.get, job_id)  # shown canceled at once
        if job is not None:
            await self.estimate([job])
        return job

    async def list(
        self, *, status: str | None, job_type: str | None, limit: int, cursor: int | None
    ) -> tuple[builtins.list[JobRecord], int | None]:
        """A page of jobs, newest first, and the cursor of the next page (None at the end)."""
        page: tuple[builtins.list[JobRecord], int | None] = await self.call(
            self.store.list, status=status, job_type=job_type, limit=limit, cursor=cursor
        )
        await self.estimate(page[0])
        return page

    async def cancel(self, job_id: str) -> JobRecord | None:
        job: JobRecord | None = await self.call(self.store.cancel, job_id)
        if job is not None:
            self.events.publish(job_id)
            if job.status == "canceled":
                self.events.publish_queue_moved()
        return job

    def queue_and_worker(self) -> tuple[dict[str, int], dict[str, Any]]:
        """Waiting and running jobs and the worker's description, for ``/health``: reads only,
        blocking (celery: Redis round trips), so run with ``call``, one trip off the loop for
        all of them (three thread hops made /health's tail under load)."""
        waiting, running = self.store.queue_counts()
        queue = {"waiting": waiting, "running": running}
        return queue, self.dispatcher.describe()

    async def retry_after_s(self, job_type: str) -> int:
        """A fair guess of when a queue slot frees up: the recent run time of this job type."""
        per_job = await self.call(self.store.recent_duration_s, job_type) or 5.0
        return max(1, math.ceil(per_job / max(1, self.workers)))

    async def preview(self, job_id: str) -> Preview | None:
        """The job's latest live preview, if it has one (none once it ended)."""
        if self.previews is None:
            return None
        preview: Preview | None = await self.call(self.previews.get, job_id)
        return preview

    async def wait_terminal(self, job_id: str, timeout: float) -> JobRecord | None:
        """The job once terminal, or its latest state when ``timeout`` runs out."""
        deadline = time.monotonic() + timeout
        job = await self.get(job_id)
        while job is not None and not job.terminal:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # The periodic re-read covers backends whose workers cannot wake us.
            await self.events.wait(job_id, min(left, 1.0))
            job = await self.get(job_id)
        return job
