"""The event journal: every job change as an entry with a durable, ordered id (docs/jobs.md).

Each store writes an entry in the same step as the change it records (SQLite: a row of
``events`` in the change's transaction; Redis: an ``XADD`` in the change's script), holding the
Job JSON right after it. Ids are opaque strings to clients; here they compare as ``(int, int)``
(SQLite ``"123"``, a Redis stream ``"1701000000000-3"``), so resuming works on either store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# What a Last-Event-ID may look like: a decimal sequence number, or a Redis stream id.
_EVENT_ID = re.compile(r"\d{1,20}(?:-\d{1,20})?")
EventKey = tuple[int, int]


@dataclass(frozen=True, slots=True)
class JournalEntry:
    id: str
    job_id: str
    type: str
    status: str
    # The Job JSON as text, serialized once when the change was recorded.
    data: str

    @property
    def key(self) -> EventKey:
        return event_key(self.id)


def is_event_id(text: str) -> bool:
    return _EVENT_ID.fullmatch(text) is not None


def event_key(event_id: str) -> EventKey:
    """The order of an id (ValueError unless ``is_event_id``)."""
    first, _, second = event_id.partition("-")
    return int(first), int(second or 0)
