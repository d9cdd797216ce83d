"""The per-job options every submit route takes as headers (jobs/submit.py), as request-body
fields a plugin's request model may declare: ``webhook: WebhookUrl = None``,
``webhook_events_filter: WebhookEvents = None``, ``keep_alive: KeepAlive = None``,
``preview: Previews = True``. The host
reads them by name from the validated body (operations.py) and they win over the headers; the
descriptions live here once, so every capability documents them alike (docs/jobs.md)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, Strict

from kiapi_core.web.schema import drop_default

WebhookUrl = Annotated[
    str | None,
    Field(
        description="kiapi extension: POST this job's events to this http(s) URL, signed per"
        " Standard Webhooks (as the X-Kiapi-Webhook header, which it overrides); must be inside"
        " the server's KIAPI_WEBHOOK_ALLOW (default loopback only), else 422.",
        max_length=2048,
        json_schema_extra=drop_default,
    ),
]
WebhookEvents = Annotated[
    list[str] | None,
    Field(
        description="kiapi extension: the events sent to `webhook`: `start`, `progress` (or"
        " `progress=500ms`: at most one per interval), `completed`; default start and completed.",
        max_length=3,
        json_schema_extra=drop_default,
    ),
]
KeepAlive = Annotated[
    float | None,
    Strict(),
    Field(
        description="kiapi extension: seconds the model stays loaded once idle after this job;"
        " 0 unloads it after the job, -1 keeps it until memory is needed or an explicit unload"
        " (as X-Kiapi-Keep-Alive, which this field wins over). At most KIAPI_MAX_KEEP_ALIVE_S;"
        " omit for KIAPI_MODEL_IDLE_TTL_S.",
        json_schema_extra=drop_default,
    ),
]
Previews = Annotated[
    bool,
    Strict(),
    Field(
        description="kiapi extension: live previews while denoising (SSE `preview` events on"
        " /v1/jobs/{id}/events, the image at GET /v1/jobs/{id}/preview); false: none for this"
        " request."
    ),
]
