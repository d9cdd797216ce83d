"""Wakes coroutines waiting on a job when whatever runs it (a thread, the worker process's
messages, another node's events) changes it.

Worker threads call ``publish(job_id, snapshot)``; sync waits ``await wait(job_id, t)`` and SSE
streams read from a ``subscribe(job_id)`` subscription. The store stays the source of truth: a
wake-up without a snapshot only means "read it again". A snapshot (the job as it was right
after the change) lets a follower report every change, even several in quick succession that
a re-read would see only as the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiapi_core.jobs.previews import PreviewInfo
    from kiapi_core.jobs.store import JobRecord

# A follower that falls this far behind gets a single "read the store" marker instead.
MAX_PENDING = 256


class Subscription:
    """Snapshots published for one job since the follower last looked (None: re-read)."""

    def __init__(self) -> None:
        self._items: list[JobRecord | PreviewInfo | None] = []
        self._ready = asyncio.Event()

    def push(self, snapshot: JobRecord | PreviewInfo | None) -> None:
        if len(self._items) >= MAX_PENDING:
            self._items = [None]
        else:
            self._items.append(snapshot)
        self._ready.set()

    async def next(self, timeout: float) -> list[JobRecord | PreviewInfo | None]:
        """What arrived since the last call, waiting up to ``timeout``; [] when nothing did."""
        if not self._items:
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                return []
        items, self._items = self._items, []
        self._ready.clear()
        return items


class JobEvents:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._subscriptions: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def watched(self, job_id: str) -> bool:
        """Someone follows this job (so a publisher should send a snapshot along)."""
        with self._lock:
            return bool(self._subscriptions.get(job_id))

    def publish(self, job_id: str, snapshot: JobRecord | None = None) -> None:
        """Safe from any thread; ``snapshot`` is the job right after the change, if known."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # RuntimeError: the loop shut down between the check and the call.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._wake, job_id, snapshot)

    def publish_preview(self, info: PreviewInfo) -> None:
        """A new live preview of ``info.job_id``: its followers get ``info`` (safe from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._push_preview, info)

    def _push_preview(self, info: PreviewInfo) -> None:
        with self._lock:
            subscriptions = list(self._subscriptions.get(info.job_id, ()))
        for subscription in subscriptions:
            subscription.push(info)

    def publish_queue_moved(self) -> None:
        """The queue moved (a job left it): every follower re-reads its job's position."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        with self._lock:
            subscriptions = [s for subs in self._subscriptions.values() for s in subs]
        for subscription in subscriptions:
            subscription.push(None)

    def _wake(self, job_id: str, snapshot: JobRecord | None) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
            subscriptions = list(self._subscriptions.get(job_id, ()))
        for event in waiters:
            event.set()
        for subscription in subscriptions:
            subscription.push(snapshot)

    async def wait(self, job_id: str, timeout: float) -> bool:
        """True when the job changed within ``timeout`` seconds."""
        event = asyncio.Event()
        with self._lock:
            self._waiters[job_id].add(event)
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(event)
                    if not waiters:
                        del self._waiters[job_id]

    @contextlib.contextmanager
    def subscribe(self, job_id: str) -> Iterator[Subscription]:
        """Receive every publish for ``job_id`` until the block ends (call on the loop)."""
        subscription = Subscription()
        with self._lock:
            self._subscriptions[job_id].add(subscription)
        try:
            yield subscription
        finally:
            with self._lock:
                subs = self._subscriptions.get(job_id)
                if subs is not None:
                    subs.discard(subscription)
                    if not subs:
                        del self._subscriptions[job_id]
