"""One node's fan-out of job changes to its SSE followers (issue #19: thousands of them).

The hub tails the event journal (jobs/journal.py) once for the whole node: a publish wakes it
(a worker thread, the worker process's messages, another node's pub/sub message), and a slow
poll catches changes nothing told it about. Each entry becomes SSE bytes once, shared by every
follower it concerns; followers never read the store for a change. A follower that does not
keep up (a reader that stopped reading) keeps at most ``FOLLOWER_CAP`` pending items: then its
intermediate progress is dropped, never an ``end``; a stream of every job that falls that far
behind is closed instead, and its client resumes from the journal with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kiapi_core.jobs.journal import EventKey, JournalEntry, event_key
from kiapi_core.jobs.status import TERMINAL

if TYPE_CHECKING:
    from kiapi_core.jobs.events import JobEvents
    from kiapi_core.jobs.previews import PreviewInfo
    from kiapi_core.jobs.service import StoreCall
    from kiapi_core.jobs.store import JobStore

log = logging.getLogger("kiapi.jobs")

FOLLOWER_CAP = 64
# Journal entries read per store call while catching up.
PAGE = 500


def frame(event_id: str, event: str, data: str) -> bytes:
    return f"id: {event_id}\nevent: {event}\ndata: {data}\n\n".encode()


def job_event(entry: JournalEntry) -> str:
    """The per-job stream's event name for an entry."""
    return "end" if entry.status in TERMINAL else "progress"


@dataclass(slots=True)
class Item:
    """One event for a follower. ``key`` None: not in the journal (a queue move, a preview);
    its id repeats the last durable one, so it is never skipped and never resumed from."""

    key: EventKey | None
    data: bytes
    droppable: bool
    last: bool = False
    # As one HTTP/1.1 chunk, for a direct write: built once per item, not once per stream.
    framed: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.framed = b"%x\r\n%b\r\n" % (len(self.data), self.data)


KEEPALIVE_ITEM = Item(None, b": keep-alive\n\n", droppable=True)
# A stream's end once its last event went out by a direct write: the task only ends the
# response (a thousand followers of one job see its end at once, not one task turn apart).
END_ITEM = Item(None, b"", droppable=False, last=True)


class Follower:
    """What one SSE stream has been sent by the hub and not written yet."""

    def __init__(self, job_id: str | None, job_type: str | None, status: str | None) -> None:
        self.job_id = job_id
        self.job_type = job_type
        self.status = status
        self.items: list[Item] = []
        # The newest journal entry this stream has sent (older ones are skipped).
        self.floor: EventKey = (0, 0)
        # Writes a framed chunk to the client's socket at once (False: not now); set once the
        # stream is live, so the hub delivers to a waiting stream without waking its task.
        self.writer: Callable[[bytes], bool] | None = None
        # A plain future per wait (no Event, no timer): the hub's tick sends keep-alives.
        self._waiter: asyncio.Future[None] | None = None
        self.pushed_at = time.monotonic()
        # Set when a stream of every job fell too far behind: it ends, its client resumes.
        self.closed = False
        self.dropped = 0

    def matches(self, entry: JournalEntry) -> bool:
        return (self.job_type is None or entry.type == self.job_type) and (
            self.status is None or entry.status == self.status
        )

    def push(self, item: Item) -> None:
        self.pushed_at = time.monotonic()
        if len(self.items) >= FOLLOWER_CAP:
            if self.job_id is None:
                self.items, self.closed = [], True
                self._wake()
                return
            kept = [i for i in self.items if not i.droppable]
            self.dropped += len(self.items) - len(kept)
            self.items = kept
        self.items.append(item)
        self._wake()

    def offer(self, item: Item) -> None:
        """Deliver ``item``: straight to the socket when the stream waits with nothing
        pending and the client keeps up; else through its task (which waits on a slow
        client, and ends the response after the last item)."""
        writer = self.writer
        waiter = self._waiter
        if writer is not None and not self.items and waiter is not None and not waiter.done():
            stale = item.key is not None and item.key <= self.floor
            if stale and not item.last:
                return
            if not stale and writer(item.framed):
                if item.key is not None:
                    self.floor = item.key
                self.pushed_at = time.monotonic()
                if item.last:
                    self.push(END_ITEM)
                return
        self.push(item)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[Item]:
        """What arrived since the last call, waiting until something does (or ``closed``)."""
        if not self.items and not self.closed:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self.items = self.items, []
        return items


class EventHub:
    def __init__(
        self,
        store: JobStore,
        call: StoreCall,
        events: JobEvents,
        poll_s: float = 1.0,
        keepalive_s: float = 15.0,
    ) -> None:
        self.store = store
        self.call = call
        self.poll_s = poll_s
        self.keepalive_s = keepalive_s
        self._by_job: defaultdict[str, set[Follower]] = defaultdict(set)
        self._all: set[Follower] = set()
        # Per followed job: the id of its newest entry, and its queue position while queued.
        self._last: dict[str, str] = {}
        self._position: dict[str, int] = {}
        self._cursor: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._start = asyncio.Lock()
        self._poked: asyncio.Event | None = None
        self._queue_moved = False
        self._keepalive_checked = 0.0
        events.listen(self.poke)
        events.listen_previews(self._preview)

    # -- followers ----------------------------------------------------------------------
    async def open(
        self, job_id: str | None = None, job_type: str | None = None, status: str | None = None
    ) -> Follower:
        """A follower of one job (``job_id``) or of every job (optionally filtered); it gets
        every entry written after this returns. Close it with ``close``."""
        follower = Follower(job_id, job_type, status)
        async with self._start:
            if self._task is None:
                self._cursor = (await self.call(self.store.event_bounds))[1]
                self._poked = asyncio.Event()
                self._task = asyncio.create_task(self._run(), name="kiapi-event-hub")
            # No await between the check above and this: the tail cannot stop in between.
            if job_id is not None:
                self._by_job[job_id].add(follower)
            else:
                self._all.add(follower)
        return follower

    def close(self, follower: Follower) -> None:
        if follower.job_id is None:
            self._all.discard(follower)
            return
        followers = self._by_job.get(follower.job_id)
        if followers is not None:
            followers.discard(follower)
            if not followers:
                del self._by_job[follower.job_id]
                self._last.pop(follower.job_id, None)
                self._position.pop(follower.job_id, None)

    def note(self, job_id: str, event_id: str, queue_position: int | None) -> None:
        """What a stream opening showed of ``job_id``: where its journal stands, its place."""
        if job_id not in self._by_job:
            return
        if job_id not in self._last or event_key(event_id) > event_key(self._last[job_id]):
            self._last[job_id] = event_id
        if queue_position is not None:
            self._position[job_id] = queue_position

    def ephemeral(self, job_id: str, event: str, data: str) -> None:
        """Send followers of ``job_id`` an event that is not in the journal (e.g. ``preview``):
        built once, dropped for readers that lag, its id the job's last durable one. Call on
        the loop."""
        followers = self._by_job.get(job_id)
        last = self._last.get(job_id)
        if not followers or last is None:
            return
        item = Item(None, frame(last, event, data), droppable=True)
        for follower in followers:
            follower.offer(item)

    def _preview(self, info: PreviewInfo) -> None:
        self.ephemeral(info.job_id, "preview", json.dumps(info.event_data()))

    @property
    def follower_count(self) -> int:
        return len(self._all) + sum(len(f) for f in self._by_job.values())

    # -- the tail ------------------------------------------------------------------------
    def poke(self, job_id: str | None) -> None:
        """A job changed (or, for None, the queue moved): read the journal soon."""
        if self._poked is None:
            return
        if job_id is None:
            self._queue_moved = True
        self._poked.set()

    async def _run(self) -> None:
        poked = self._poked
        assert poked is not None
        try:
            while self._all or self._by_job:
                try:
                    async with asyncio.timeout(min(self.poll_s, self.keepalive_s)):
                        await poked.wait()
                except TimeoutError:
                    pass
                poked.clear()
                moved, self._queue_moved = self._queue_moved, False
                try:
                    await self._drain()
                    if moved and self._position:
                        await self._refresh_positions()
                    self._keep_alive()
                except Exception:
                    # A store error (Redis gone, a locked database): followers wait, the next
                    # round tries again.
                    log.exception("reading the event journal failed")
                    await asyncio.sleep(self.poll_s)
        finally:
            self._task = None

    def _keep_alive(self) -> None:
        """A comment line to every stream that had nothing for ``keepalive_s`` (one timer for
        the node instead of one per stream)."""
        now = time.monotonic()
        if now - self._keepalive_checked < min(self.poll_s, self.keepalive_s):
            return
        self._keepalive_checked = now
        for follower in [*self._all, *(f for fs in self._by_job.values() for f in fs)]:
            if now - follower.pushed_at >= self.keepalive_s:
                follower.offer(KEEPALIVE_ITEM)

    async def _drain(self) -> None:
        while True:
            entries = await self.call(self.store.events_after, self._cursor, limit=PAGE)
            for entry in entries:
                self._dispatch(entry)
            if entries:
                self._cursor = entries[-1].id
            if len(entries) < PAGE:
                return

    def _dispatch(self, entry: JournalEntry) -> None:
        followers = self._by_job.get(entry.job_id)
        if followers:
            terminal = entry.status in TERMINAL
            item = Item(
                entry.key,
                frame(entry.id, job_event(entry), entry.data),
                droppable=not terminal,
                last=terminal,
            )
            for follower in list(followers):
                follower.offer(item)
            self._last[entry.job_id] = entry.id
            if entry.status == "queued":
                self._position[entry.job_id] = json.loads(entry.data).get("queue_position")
            else:
                self._position.pop(entry.job_id, None)
        if self._all:
            shared: Item | None = None
            for follower in list(self._all):
                if follower.matches(entry):
                    shared = shared or Item(
                        entry.key, frame(entry.id, "job", entry.data), droppable=False
                    )
                    follower.offer(shared)

    async def _refresh_positions(self) -> None:
        """The queue moved: one read per followed queued job, an event where its place changed."""
        for job_id, known in list(self._position.items()):
            job = await self.call(self.store.get, job_id)
            last = self._last.get(job_id)
            if job is None or job.status != "queued" or last is None:
                continue  # not queued any more: its journal entry says so
            if job.queue_position == known or job_id not in self._by_job:
                continue
            self._position[job_id] = job.queue_position or known
            item = Item(None, frame(last, "progress", json.dumps(job.to_json())), droppable=True)
            for follower in self._by_job[job_id]:
                follower.offer(item)
