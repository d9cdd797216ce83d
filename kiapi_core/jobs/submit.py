"""What a submit may ask for in its headers, whatever the capability (docs/jobs.md).

- ``Idempotency-Key: <1..255 printable ASCII>``: a repeat of the same request (same route, job
  type and JSON body, compared canonically) within KIAPI_IDEMPOTENCY_TTL_S gets the first one's
  job instead of a new one, answered with ``Idempotent-Replayed: true``; the key with another
  request is a 422. The body is compared, not the job's params: a route may draw values (a seed)
  into the params, and a repeat must still count as the same request.
- ``Prefer`` (RFC 7240): ``respond-async`` answers a sync submit 202 at once; ``wait=N`` waits
  at most N seconds, then answers 202 with the Job (``Preference-Applied`` says which applied).
- ``Cancel-After: <duration>`` (as Replicate): seconds (``90``, ``2.5``) or units (``500ms``,
  ``30s``, ``5m``, ``1h30m``); a job not started by then ends canceled and never runs, and a
  running one is canceled at its next progress report.
- ``X-Kiapi-Priority: <-10..10>``: higher runs first, FIFO among equals (default 0).
- ``X-Kiapi-Webhook: <http(s) URL>`` and ``X-Kiapi-Webhook-Events: start,progress,completed``
  (``progress=500ms`` for at most one progress event per 500 ms; default start,completed): the
  job's events are POSTed there, signed (docs/jobs.md#webhooks). A body's ``webhook`` /
  ``webhook_events_filter`` win over the headers; KIAPI_WEBHOOK_URL is the default. A URL
  outside KIAPI_WEBHOOK_ALLOW is a 422.
- ``X-Kiapi-Keep-Alive: <seconds | duration | 0 | -1>`` (as Ollama's ``keep_alive``): how long
  the job's model stays loaded once idle after it, at most KIAPI_MAX_KEEP_ALIVE_S; 0 unloads it
  after the job, -1 keeps it until memory is needed or an explicit unload. A body's
  ``keep_alive`` field (ideogram4, zimage, ``POST /v1/models/{id}/load``) wins over the header.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from kiapi_core.host import host
from kiapi_core.jobs.store import PRIORITY_MAX, PRIORITY_MIN, IdempotencyKey, JobRecord
from kiapi_core.web.errors import ApiError, invalid
from kiapi_core.webhooks.spec import MAX_URL_CHARS, WebhookSpec, parse_events
from kiapi_core.webhooks.targets import (
    AllowList,
    TargetRefused,
    check_host,
    needs_lookup,
    parse_target,
    resolve,
)

IDEMPOTENCY_KEY = "Idempotency-Key"
PRIORITY = "X-Kiapi-Priority"
CANCEL_AFTER = "Cancel-After"
WEBHOOK = "X-Kiapi-Webhook"
WEBHOOK_EVENTS = "X-Kiapi-Webhook-Events"
KEEP_ALIVE = "X-Kiapi-Keep-Alive"
MAX_KEY_CHARS = 255
MAX_CANCEL_AFTER_S = 30 * 86400.0
REPLAYED = {"Idempotent-Replayed": "true"}
_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(h|ms|m|s))+$")
_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@dataclass(frozen=True)
class SubmitOptions:
    idempotency_key: str | None = None
    priority: int = 0
    cancel_after_s: float | None = None
    respond_async: bool = False
    wait_s: int | None = None
    webhook_url: str | None = None
    webhook_events: str | None = None
    keep_alive_s: float | None = None


def parse_prefer(values: list[str]) -> dict[str, str]:
    """RFC 7240 preferences: ``token[=value][;params]`` separated by commas, over every Prefer
    header; names case-insensitive, quoted values unquoted, the first of a repeated one wins."""
    found: dict[str, str] = {}
    for header in values:
        for item in header.split(","):
            name, _, value = item.split(";", 1)[0].partition("=")
            name = name.strip().lower()
            if name and name not in found:
                found[name] = value.strip().strip('"')
    return found


def parse_cancel_after(text: str) -> float:
    """Seconds from a Cancel-After value; ValueError naming the rule."""
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        if not _DURATION.match(text):
            raise ValueError(
                "must be seconds (e.g. 90 or 2.5) or a duration like 500ms, 30s, 5m, 1h30m"
            ) from None
        seconds = sum(float(n) * _UNIT_S[u] for n, u in _PART.findall(text))
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_CANCEL_AFTER_S):
        raise ValueError(f"must be more than 0 and at most {MAX_CANCEL_AFTER_S:g} seconds")
    return seconds


def keep_alive_rule(max_s: float) -> str:
    return (
        f"must be -1 (keep until memory is needed), 0 (unload after the job) or seconds up to"
        f" KIAPI_MAX_KEEP_ALIVE_S={max_s:g} (a number, or a duration like 90s, 5m, 1h)"
    )


def check_keep_alive(value: float, max_s: float, loc: list[str | int]) -> float:
    """``value`` if it is a keep_alive the server allows, else a 422 naming ``loc``."""
    if not (math.isfinite(value) and (value in (-1, 0) or 0 < value <= max_s)):
        raise invalid(loc, keep_alive_rule(max_s), "keep_alive")
    return float(value)


def parse_keep_alive(text: str, max_s: float) -> float:
    """The seconds of an X-Kiapi-Keep-Alive value, or a 422 naming the header and the rule."""
    text = text.strip().lower()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
        if _DURATION.match(text):
            value = sum(float(n) * _UNIT_S[u] for n, u in _PART.findall(text))
    return check_keep_alive(value, max_s, ["header", KEEP_ALIVE])


def submit_options(request: Request) -> SubmitOptions:
    """The submit headers of ``request``, or a 422 naming the header and its rule."""
    headers = request.headers
    key = headers.get(IDEMPOTENCY_KEY)
    if key is not None and not _KEY.match(key):
        raise invalid(
            ["header", IDEMPOTENCY_KEY],
            f"must be 1 to {MAX_KEY_CHARS} printable ASCII characters (got {len(key)} characters)",
            "string_pattern_mismatch",
        )
    priority = 0
    raw = headers.get(PRIORITY)
    if raw is not None:
        try:
            priority = int(raw.strip())
        except ValueError:
            priority = PRIORITY_MAX + 1
        if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            raise invalid(
                ["header", PRIORITY],
                f"must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX} (higher runs first)",
                "int_range",
            )
    cancel_after = None
    raw = headers.get(CANCEL_AFTER)
    if raw is not None:
        try:
            cancel_after = parse_cancel_after(raw)
        except ValueError as exc:
            raise invalid(["header", CANCEL_AFTER], str(exc)) from None
    keep_alive = None
    raw = headers.get(KEEP_ALIVE)
    if raw is not None:
        keep_alive = parse_keep_alive(raw, host(request).settings.max_keep_alive_s)
    prefer = parse_prefer(headers.getlist("prefer"))
    wait = prefer.get("wait")
    return SubmitOptions(
        idempotency_key=key,
        priority=priority,
        cancel_after_s=cancel_after,
        respond_async="respond-async" in prefer,
        # A malformed preference is ignored, as RFC 7240 asks of every one not understood.
        wait_s=int(wait) if wait is not None and wait.isdigit() else None,
        webhook_url=headers.get(WEBHOOK),
        webhook_events=headers.get(WEBHOOK_EVENTS),
        keep_alive_s=keep_alive,
    )


async def webhook_for(
    request: Request,
    opts: SubmitOptions,
    url: str | None = None,
    events: list[str] | None = None,
) -> WebhookSpec | None:
    """The job's webhook: the body's ``url`` / ``events``, else the headers, else the server's
    default; a 422 naming the header or field and its rule. A host name not listed by name is
    looked up off the loop: all its addresses must be allowed."""
    settings = host(request).settings
    url_loc: list[str | int] = ["body", "webhook"] if url is not None else ["header", WEBHOOK]
    events_loc: list[str | int] = (
        ["body", "webhook_events_filter"] if events is not None else ["header", WEBHOOK_EVENTS]
    )
    if url is None:
        url = opts.webhook_url
    if events is None and opts.webhook_events is not None:
        events = opts.webhook_events.split(",")
    if url is None and settings.webhook_url is not None:
        url, url_loc = settings.webhook_url, ["setting", "KIAPI_WEBHOOK_URL"]
    if url is None:
        if events is not None:
            raise invalid(events_loc, f"needs a webhook URL ({WEBHOOK} or the body's webhook)")
        return None
    floor = settings.webhook_progress_interval_ms
    try:
        chosen, progress_ms = parse_events(
            events if events is not None else settings.webhook_events, floor
        )
    except ValueError as exc:
        raise invalid(events_loc, str(exc)) from None
    allow = AllowList.parse(settings.webhook_allow)
    try:
        target = parse_target(url)
        addresses = (
            await asyncio.to_thread(resolve, target) if needs_lookup(target, allow) else None
        )
        check_host(target, allow, addresses)
    except TargetRefused as exc:
        raise invalid(url_loc, f"webhook URL {url[:200]!r} {exc}", "webhook_target") from None
    return WebhookSpec(target.url, chosen, progress_ms)


async def idempotency_for(
    request: Request, job_type: str, key: str | None, ttl_s: float, suffix: str = ""
) -> IdempotencyKey | None:
    """The key with a hash of what it came with: route, job type and the body as canonical
    JSON (key order and spacing do not matter)."""
    if key is None:
        return None
    raw = await request.body()
    try:
        body: Any = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
    except ValueError:
        body = raw.decode("utf-8", "replace")
    text = "\n".join([request.method, request.url.path, job_type, body])
    return IdempotencyKey(key + suffix, hashlib.sha256(text.encode()).hexdigest(), ttl_s)


def key_conflict(key: str, job_id: str) -> ApiError:
    return invalid(
        ["header", IDEMPOTENCY_KEY],
        f"{IDEMPOTENCY_KEY} {key[:64]!r} was first sent with a different request (it created"
        f" {job_id}); send a new key for a new request",
        "idempotency_key_reused",
    )


def accepted(job: JobRecord, applied: list[str], extra: dict[str, str]) -> JSONResponse:
    """202 with the Job JSON (plus ``job_id``, the async answer's field) for a sync submit
    whose Prefer asked not to wait, or not that long."""
    headers = {"Location": f"/v1/jobs/{job.id}", "Preference-Applied": ", ".join(applied)}
    return JSONResponse(
        {**job.to_json(), "job_id": job.id}, status_code=202, headers={**headers, **extra}
    )


def _header(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": schema,
        "description": description,
    }


PRIORITY_PARAM = _header(
    PRIORITY,
    {"type": "integer", "minimum": PRIORITY_MIN, "maximum": PRIORITY_MAX, "default": 0},
    "kiapi extension: the job's priority; higher runs first, FIFO among equals.",
)
CANCEL_AFTER_PARAM = _header(
    CANCEL_AFTER,
    {"type": "string", "examples": ["90", "2.5", "500ms", "30s", "5m", "1h30m"]},
    "A deadline, from now: not started by then, the job ends canceled (`deadline passed"
    " before start`) and never runs; still running then, it is canceled at its next step."
    f" Seconds or a duration in h/m/s/ms, at most {MAX_CANCEL_AFTER_S:g} s.",
)
# Every job-submitting operation takes these: an Operation's OpenAPI names them in
# ``components.parameters`` and its ``x-kiapi-submit-headers``; /v1/images/generations lists them.
_SUBMIT_PARAMS = [
    _header(
        IDEMPOTENCY_KEY,
        {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS},
        "Printable ASCII. A repeat of the same request (route, job type, JSON body) within"
        " KIAPI_IDEMPOTENCY_TTL_S gets the first one's job and answer, with"
        " `Idempotent-Replayed: true`; the key with a different request is a 422.",
    ),
    _header(
        "Prefer",
        {"type": "string", "examples": ["respond-async", "wait=10", "respond-async, wait=5"]},
        "RFC 7240, for a sync request: `respond-async` answers 202 with the Job at once;"
        " `wait=N` waits at most N seconds, then answers 202 with the Job if it has not"
        " finished (`Preference-Applied` names what applied). KIAPI_SYNC_TIMEOUT_S still ends"
        " any wait with a 504.",
    ),
    CANCEL_AFTER_PARAM,
    PRIORITY_PARAM,
    _header(
        WEBHOOK,
        {"type": "string", "format": "uri", "maxLength": MAX_URL_CHARS},
        "kiapi extension: POST the job's events here (Standard Webhooks signatures:"
        " webhook-id, webhook-timestamp, webhook-signature); must be inside"
        " KIAPI_WEBHOOK_ALLOW (default loopback only), else 422. Default KIAPI_WEBHOOK_URL.",
    ),
    _header(
        WEBHOOK_EVENTS,
        {"type": "string", "examples": ["start,completed", "start,progress=500ms,completed"]},
        "kiapi extension: which events: start, progress (at most every"
        " KIAPI_WEBHOOK_PROGRESS_INTERVAL_MS, or `progress=2s`), completed. Default"
        " start,completed (KIAPI_WEBHOOK_EVENTS).",
    ),
    _header(
        KEEP_ALIVE,
        {"type": "string", "examples": ["300", "5m", "0", "-1"]},
        "kiapi extension (Ollama's `keep_alive`): how long the job's model stays loaded once"
        " idle after it, in seconds or h/m/s/ms, at most KIAPI_MAX_KEEP_ALIVE_S; `0` unloads it"
        " after the job, `-1` keeps it until memory is needed or `DELETE"
        " /v1/models/{family}/{name}/resident`. Default: KIAPI_MODEL_IDLE_TTL_S. A body's"
        " `keep_alive` wins over it.",
    ),
]
SUBMIT_PARAMS: dict[str, dict[str, Any]] = {p["name"]: p for p in _SUBMIT_PARAMS}
SUBMIT_HEADER_REFS = [{"$ref": f"#/components/parameters/{name}"} for name in SUBMIT_PARAMS]
REPLAYED_HEADER = {
    "Idempotent-Replayed": {
        "description": "`true` when an Idempotency-Key repeat got the first request's job.",
        "schema": {"type": "string", "enum": ["true"]},
    }
}
PREFERENCE_APPLIED_HEADER = {
    "Preference-Applied": {
        "description": "The Prefer preferences applied: `respond-async`, `wait=N`.",
        "schema": {"type": "string"},
    }
}
