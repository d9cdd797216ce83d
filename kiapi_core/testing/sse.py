"""Reading a job's Server-Sent Events in tests (kiapi's and plugins')."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class SseEvent:
    id: str | None
    event: str
    data: dict[str, Any]


def job_events(
    client: Any,
    job_id: str,
    on_event: Callable[[SseEvent], None] | None = None,
    timeout: float = 120,
) -> list[SseEvent]:
    """Every event of ``GET /v1/jobs/{job_id}/events`` until the stream ends (after ``end``);
    ``on_event`` sees each as it arrives (to act while the job still runs). An answer that is
    not an event stream fails the test (AssertionError with its status and body)."""
    events: list[SseEvent] = []
    fields: dict[str, str] = {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as stream:
        kind = stream.headers.get("content-type", "")
        if stream.status_code != 200 or not kind.startswith("text/event-stream"):
            stream.read()
            raise AssertionError(
                f"GET /v1/jobs/{job_id}/events answered {stream.status_code} {kind}: {stream.text}"
            )
        for line in stream.iter_lines():
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if "data" in fields:
                event = SseEvent(
                    fields.get("id"), fields.get("event", ""), json.loads(fields["data"])
                )
                events.append(event)
                if on_event is not None:
                    on_event(event)
            fields = {}
    return events
