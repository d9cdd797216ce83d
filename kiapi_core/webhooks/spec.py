"""What a submit asks of webhooks: a URL and the events it wants (``X-Kiapi-Webhook``,
``X-Kiapi-Webhook-Events``, or the body fields ``webhook`` / ``webhook_events_filter``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

EVENTS = ("start", "progress", "completed")
# Without a filter: the job's start and its end; progress is opt-in (it is chatty).
DEFAULT_EVENTS = ("start", "completed")
MAX_URL_CHARS = 2048
_INTERVAL = re.compile(r"^(\d+(?:\.\d+)?)(ms|s)?$")


@dataclass(frozen=True)
class WebhookSpec:
    """A job's webhook: where to, which events, and at least how far apart progress events
    are (ms). Stored on the job as JSON (``to_json``)."""

    url: str
    events: tuple[str, ...] = DEFAULT_EVENTS
    progress_ms: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "events": list(self.events), "progress_ms": self.progress_ms}

    @classmethod
    def from_json(cls, data: Any) -> WebhookSpec | None:
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            return None
        events = tuple(e for e in data.get("events") or () if e in EVENTS)
        progress = data.get("progress_ms")
        return cls(data["url"], events, progress if isinstance(progress, int) else 0)


def parse_events(items: list[str], floor_ms: int) -> tuple[tuple[str, ...], int]:
    """Events and the progress interval from ``start``, ``progress`` (or ``progress=500ms``,
    ``progress=2s``), ``completed``; ValueError naming the rule. The interval is never below
    ``floor_ms`` (KIAPI_WEBHOOK_PROGRESS_INTERVAL_MS)."""
    events: list[str] = []
    progress_ms = floor_ms
    for raw in items:
        item = raw.strip().lower()
        if not item:
            continue
        name, _, value = item.partition("=")
        if name not in EVENTS or (value and name != "progress"):
            raise ValueError(
                f"{raw.strip()[:40]!r} is not an event: use start, progress (or progress=500ms)"
                " and completed, comma-separated"
            )
        if value:
            match = _INTERVAL.match(value)
            if match is None:
                raise ValueError(f"progress={value[:20]}: the interval must be like 500ms or 2s")
            number = float(match.group(1)) * (1000 if match.group(2) == "s" else 1)
            progress_ms = max(floor_ms, min(int(number), 3_600_000))
        if name not in events:
            events.append(name)
    if not events:
        raise ValueError("names no event: use start, progress and completed, comma-separated")
    return tuple(e for e in EVENTS if e in events), progress_ms
