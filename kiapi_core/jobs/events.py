"""Wakes coroutines waiting on a job when whatever runs it (a thread, the worker process's
messages, another node's events) changes it.

Worker threads call ``publish(job_id)``; sync waits ``await wait(job_id, t)``, and the node's
``EventHub`` (jobs/fanout.py) hears every publish through ``listen`` and reads the event journal
for what changed. The store stays the source of truth: a wake-up only means "read it again".
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiapi_core.jobs.previews import PreviewInfo

# Called on the loop with the job id that changed, or None for "the queue moved".
Listener = Callable[[str | None], None]
# Called on the loop with a new live preview (not in the journal: ephemeral).
PreviewListener = Callable[["PreviewInfo"], None]


class JobEvents:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._listeners: list[Listener] = []
        self._preview_listeners: list[PreviewListener] = []
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def listen(self, listener: Listener) -> None:
        """Hear every publish, on the loop (the event hub: one per node)."""
        self._listeners.append(listener)

    def listen_previews(self, listener: PreviewListener) -> None:
        """Hear every new live preview, on the loop (the event hub sends it to followers)."""
        self._preview_listeners.append(listener)

    def publish_preview(self, info: PreviewInfo) -> None:
        """A new live preview of ``info.job_id`` (safe from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._tell_preview, info)

    def _tell_preview(self, info: PreviewInfo) -> None:
        for listener in self._preview_listeners:
            listener(info)

    def publish(self, job_id: str) -> None:
        """The job changed: its waiters and followers re-read it (safe from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # RuntimeError: the loop shut down between the check and the call.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._wake, job_id)

    def publish_queue_moved(self) -> None:
        """The queue moved (a job left it): followers of queued jobs re-read their position."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._tell, None)

    def _tell(self, job_id: str | None) -> None:
        for listener in self._listeners:
            listener(job_id)

    def _wake(self, job_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for event in waiters:
            event.set()
        self._tell(job_id)

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
