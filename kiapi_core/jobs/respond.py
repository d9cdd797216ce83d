"""The one helper a plugin route calls to run its work as a job and answer the client.

``await respond_with_job(request, job_type=..., params=..., mode=..., media_type=...)`` handles
sync/async, ``Accept`` negotiation, raw artifact bytes vs Job JSON, the sync timeout (504), the
queue bound (429) and failures mapped to the right status.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from kiapi_core.files.store import content_disposition
from kiapi_core.host import host
from kiapi_core.jobs.service import NoHandler
from kiapi_core.jobs.status import ErrorKind, failure_http_status
from kiapi_core.jobs.store import IdempotencyConflict, NotStrictJson, QueueFull
from kiapi_core.jobs.submit import (
    REPLAYED,
    accepted,
    check_keep_alive,
    idempotency_for,
    key_conflict,
    submit_options,
    webhook_for,
)
from kiapi_core.web.errors import ApiError, invalid
from kiapi_core.web.negotiation import MalformedAccept, choose

JSON = "application/json"


def _negotiate(request: Request, media_type: str | None) -> str:
    offers = [media_type, JSON] if media_type else [JSON]
    accept = request.headers.get("accept")
    try:
        chosen = choose(accept, offers)
    except MalformedAccept as exc:
        raise ApiError(406, f"{exc}; use e.g. 'Accept: {offers[0]}' or 'Accept: {JSON}'") from None
    if chosen is None:
        raise ApiError(
            406,
            f"Accept {accept!r} matches nothing this endpoint returns;"
            f" offered: {', '.join(offers)}",
        )
    return chosen


async def respond_with_job(
    request: Request,
    *,
    job_type: str,
    params: dict[str, Any],
    mode: str = "sync",
    media_type: str | None = None,
    webhook: str | None = None,
    webhook_events: list[str] | None = None,
    keep_alive: float | None = None,
) -> Response:
    """Submit a job and answer: 202 for async, the artifact or Job JSON for sync.

    ``media_type`` is what the single artifact will be (e.g. ``image/png``); it lets a sync
    request without a JSON preference get the raw bytes, and an impossible ``Accept`` fail
    with 406 before any work is queued. The job must then save exactly one file, whatever
    the request's mode and ``Accept``: a handler that saves another number fails its job.
    A handler's ``JobFailed(status, detail)`` (or ``ApiError``) is answered with that status.
    ``webhook`` / ``webhook_events``: the body's webhook URL and event filter, if it has them
    (they win over X-Kiapi-Webhook / X-Kiapi-Webhook-Events).
    ``keep_alive`` (a body's field, seconds; 0 / -1 as X-Kiapi-Keep-Alive) wins over the header.
    """
    if mode not in ("sync", "async"):
        raise invalid(["body", "mode"], "must be 'sync' or 'async'", "literal_error")
    h = host(request)
    chosen = _negotiate(request, media_type) if mode == "sync" else JSON
    opts = submit_options(request)  # Idempotency-Key, Prefer, Cancel-After, priority
    if keep_alive is not None:
        keep_alive = check_keep_alive(
            keep_alive, h.settings.max_keep_alive_s, ["body", "keep_alive"]
        )
    else:
        keep_alive = opts.keep_alive_s
    key = await idempotency_for(
        request, job_type, opts.idempotency_key, h.settings.idempotency_ttl_s
    )
    hook = await webhook_for(request, opts, webhook, webhook_events)
    try:
        job = await h.jobs.submit(
            job_type,
            params,
            artifact_type=media_type,
            priority=opts.priority,
            cancel_after_s=opts.cancel_after_s,
            idempotency=key,
            webhook=hook,
            keep_alive_s=keep_alive,
        )
    except IdempotencyConflict as exc:
        raise key_conflict(opts.idempotency_key or "", exc.job_id) from None
    except NoHandler as exc:
        raise ApiError(503, str(exc)) from None
    except QueueFull as exc:
        retry = await h.jobs.retry_after_s(job_type)
        raise ApiError(
            429, f"{exc}; retry in about {retry}s", headers={"Retry-After": str(retry)}
        ) from None
    except NotStrictJson as exc:
        # The body was strict JSON (read_json): the route built these params itself.
        raise ApiError(
            500, f"the {job_type!r} route built job params the store refuses: {exc}"
        ) from None
    replay = REPLAYED if job.replayed else {}
    if mode == "async":
        # A new job is queued; a replay answers what the first submit did.
        return JSONResponse(
            {"job_id": job.id, "type": job.type, "status": "queued"},
            status_code=202,
            headers={"Location": f"/v1/jobs/{job.id}", **replay},
        )
    if opts.respond_async and opts.wait_s is None:
        return accepted(job, ["respond-async"], replay)
    timeout = h.settings.sync_timeout_s
    wait = min(timeout, opts.wait_s) if opts.wait_s is not None else timeout
    capped = wait < timeout
    # A client that goes away does not cancel the job: it can still be polled.
    done = await h.jobs.wait_terminal(job.id, wait)
    if done is None:
        raise ApiError(500, f"job {job.id} vanished from the store", job_id=job.id)
    if not done.terminal and capped:
        applied = ["respond-async"] * opts.respond_async + [f"wait={opts.wait_s}"]
        return accepted(done, applied, replay)
    if not done.terminal:
        raise ApiError(
            504,
            f"job {job.id} did not finish within"
            f" KIAPI_SYNC_TIMEOUT_S={h.settings.sync_timeout_s:g}s;"
            f" it keeps running: poll GET /v1/jobs/{job.id}",
            job_id=job.id,
            job_status=done.status,
            headers=replay or None,
        )
    if done.status != "succeeded":
        status = failure_http_status(done.status, done.error_kind, done.error_status)
        detail: Any = done.error
        if done.error_kind in (ErrorKind.invalid_input, ErrorKind.http_error) and done.result:
            detail = done.result.get("detail", done.error)
        raise ApiError(
            status, detail, job_id=done.id, job_status=done.status, headers=replay or None
        )
    # Chosen from the request alone: never from what the handler happened to save.
    if chosen == JSON:
        return JSONResponse(done.to_json(), headers=replay)
    if len(done.artifacts) != 1:  # a job stored before the count was checked
        raise ApiError(
            500,
            f"job {done.id} saved {len(done.artifacts)} files, not the one {media_type} this"
            f" route answers with; GET /v1/jobs/{done.id} lists them",
            job_id=done.id,
            headers=replay or None,
        )
    info = await h.call(h.files.get, done.artifacts[0])
    if info is None:
        raise ApiError(410, f"the artifact of job {done.id} was deleted", job_id=done.id)
    return FileResponse(
        h.files.blob_path(info),
        media_type=info.content_type,
        headers={
            "X-Kiapi-File-Id": info.id,
            "X-Kiapi-Job-Id": done.id,
            "ETag": f'"{info.sha256}"',
            "Content-Disposition": content_disposition("inline", info.filename),
            **replay,
        },
    )
