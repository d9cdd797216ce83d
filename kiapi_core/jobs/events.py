"""Wakes coroutines waiting on a job when a worker thread changes it.

Worker threads call ``publish(job_id)``; SSE streams and sync waits ``await wait(job_id, t)``.
The store stays the source of truth: a wake-up only means "read it again".
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict


class JobEvents:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def publish(self, job_id: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._wake, job_id)
        except RuntimeError:  # the loop shut down between the check and the call
            pass

    def _wake(self, job_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for event in waiters:
            event.set()

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
