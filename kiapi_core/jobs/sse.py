"""The two SSE streams of job changes: ``/v1/jobs/{id}/events`` and ``/v1/events``.

Every event's ``id:`` is a journal id (jobs/journal.py). A client that reconnects with
``Last-Event-ID`` (or ``?last_event_id=``) gets exactly the entries after it, then live ones;
an id the journal no longer holds (older than KIAPI_EVENTS_RETAIN entries, or from another
store) gets ``event: reset`` first and then what a fresh connection gets. Events that are not
in the journal (a queued job's new place, previews) repeat the last durable id.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kiapi_core.jobs.fanout import Follower, frame, job_event
from kiapi_core.jobs.journal import EventKey, JournalEntry, event_key
from kiapi_core.jobs.status import TERMINAL

if TYPE_CHECKING:
    from kiapi_core.jobs.service import JobService
    from kiapi_core.jobs.store import JobRecord

RETRY = b"retry: 2000\n\n"
PAGE = 500


@dataclass
class EventStream:
    service: JobService
    follower: Follower
    # Sent first: a reset, the current state, or the first page of the backlog.
    opening: list[bytes]
    floor: EventKey
    # Set by the route: the server's direct body writer for this response, if it has one.
    writer: Callable[[bytes], bool] | None = None
    # The backlog goes on past the first page from this id (None: it fit in the opening).
    more_after: str | None = None
    # Nothing follows the opening (it holds the job's end).
    done: bool = False
    filters: dict[str, str | None] = field(default_factory=dict)
    _closed: bool = False

    @property
    def empty(self) -> bool:
        return self.done and not self.opening

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.service.hub.close(self.follower)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            yield RETRY + b"".join(self.opening)
            if self.done:
                return
            after = self.more_after
            while after is not None:
                page = await self.service.call(
                    self.service.store.events_after, after, limit=PAGE, **self.filters
                )
                out, ended = self._frames(page)
                if out:
                    yield out
                if ended:
                    return
                after = page[-1].id if len(page) == PAGE else None
            follower = self.follower
            follower.floor = self.floor
            follower.writer = self.writer
            while not follower.closed:
                items = await follower.take()
                chunks: list[bytes] = []
                last = False
                for item in items:
                    if item.key is not None:
                        if item.key <= follower.floor:
                            continue  # the opening or the backlog had it
                        follower.floor = item.key
                    if item.data:
                        chunks.append(item.data)
                    if item.last:
                        last = True
                        break
                if chunks:
                    yield b"".join(chunks)
                if last:
                    return
        finally:
            self.close()

    def _frames(self, page: list[JournalEntry]) -> tuple[bytes, bool]:
        per_job = self.follower.job_id is not None
        out: list[bytes] = []
        for entry in page:
            self.floor = entry.key
            out.append(frame(entry.id, job_event(entry) if per_job else "job", entry.data))
            if per_job and entry.status in TERMINAL:
                return b"".join(out), True
        return b"".join(out), False


def _reset(event_id: str, last_id: str) -> bytes:
    detail = (
        f"Last-Event-ID {last_id} is not in the event journal (older than the"
        " KIAPI_EVENTS_RETAIN entries kept, or from another server): events may have been"
        " missed; the stream starts again from the current state"
    )
    return frame(event_id, "reset", json.dumps({"detail": detail, "last_event_id": last_id}))


async def _known(service: JobService, last_id: str) -> tuple[bool, str | None]:
    """Whether the journal holds everything after ``last_id``; and its newest id."""
    low, high = await service.call(service.store.event_bounds)
    key = event_key(last_id)
    known = low is not None and high is not None and event_key(low) <= key <= event_key(high)
    return known, high


async def open_job_stream(service: JobService, job: JobRecord, last_id: str | None) -> EventStream:
    """The stream of one job: the follower is registered before anything is read, so a
    change between the reads and the first live event is neither lost nor sent twice."""
    follower = await service.hub.open(job_id=job.id)
    try:
        opening: list[bytes] = []
        if last_id is not None:
            known, high = await _known(service, last_id)
            if not known:
                opening.append(_reset(high or "0", last_id))
                last_id = None
        # The state before the backlog: a job terminal here has its end entry in it.
        current = await service.get(job.id) or job
        if last_id is None:
            event_id = await service.call(service.store.last_event_id, job.id)
            if event_id is None:
                event_id = (await service.call(service.store.event_bounds))[1] or "0"
            kind = "end" if current.terminal else "progress"
            opening.append(frame(event_id, kind, json.dumps(current.to_json(), allow_nan=False)))
            service.hub.note(job.id, event_id, current.queue_position)
            return EventStream(
                service, follower, opening, event_key(event_id), done=current.terminal
            )
        page = await service.call(service.store.events_after, last_id, job_id=job.id, limit=PAGE)
        stream = EventStream(service, follower, [], event_key(last_id), filters={"job_id": job.id})
        out, ended = stream._frames(page)
        stream.opening = [out] if out else []
        stream.done = ended or (not page and current.terminal)
        if len(page) == PAGE and not ended:
            stream.more_after = page[-1].id
        service.hub.note(job.id, page[-1].id if page else last_id, current.queue_position)
        return stream
    except BaseException:
        service.hub.close(follower)
        raise


async def open_all_stream(
    service: JobService, last_id: str | None, job_type: str | None, status: str | None
) -> EventStream:
    """Every job's changes (``type`` / ``status`` filters), from ``last_id`` or from now."""
    follower = await service.hub.open(job_type=job_type, status=status)
    filters: dict[str, str | None] = {"job_type": job_type, "status": status}
    try:
        opening: list[bytes] = []
        if last_id is not None:
            known, high = await _known(service, last_id)
            if not known:
                opening.append(_reset(high or "0", last_id))
                last_id = None
        if last_id is None:
            head = (await service.call(service.store.event_bounds))[1] or "0"
            return EventStream(service, follower, opening, event_key(head), filters=filters)
        return EventStream(
            service, follower, [], event_key(last_id), more_after=last_id, filters=filters
        )
    except BaseException:
        service.hub.close(follower)
        raise
