"""/v1/jobs: list, read, cancel, retry, reprioritize, and follow jobs as Server-Sent Events."""

from __future__ import annotations

from pydantic import ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from kiapi_core.host import host
from kiapi_core.ids import is_job_id
from kiapi_core.jobs.journal import is_event_id
from kiapi_core.jobs.service import NoHandler
from kiapi_core.jobs.sse import EventStream, open_all_stream, open_job_stream
from kiapi_core.jobs.status import JobStatus
from kiapi_core.jobs.store import PRIORITY_MAX, PRIORITY_MIN, JobRecord, NotRetryable, QueueFull
from kiapi_core.jobs.submit import PRIORITY, submit_options, webhook_for
from kiapi_core.web.body import read_json
from kiapi_core.web.errors import ApiError, invalid
from kiapi_core.web.paging import cursor_param, limit_param
from kiapi_core.web.protocol import SSE_WRITER
from kiapi_core.web.schema import Schema
from kiapi_core.webhooks.spec import WebhookSpec


async def _job_or_404(request: Request) -> JobRecord:
    job_id = request.path_params["job_id"]
    job = await host(request).jobs.get(job_id) if is_job_id(job_id) else None
    if job is None:
        raise ApiError(404, f"no job {job_id[:64]!r}; job ids look like job_0123456789abcdef")
    return job


async def list_jobs(request: Request) -> Response:
    q = request.query_params
    status = q.get("status")
    if status is not None and status not in JobStatus.__members__:
        allowed = ", ".join(JobStatus.__members__)
        raise invalid(["query", "status"], f"must be one of {allowed}", "enum")
    job_type = q.get("type") or None
    jobs, nxt = await host(request).jobs.list(
        status=status, job_type=job_type, limit=limit_param(q), cursor=cursor_param(q)
    )
    return JSONResponse(
        {"jobs": [j.to_json() for j in jobs], "next_cursor": str(nxt) if nxt else None}
    )


async def get_job(request: Request) -> Response:
    return JSONResponse((await _job_or_404(request)).to_json())


def _not_cancelable(job: JobRecord) -> ApiError:
    return ApiError(
        409,
        f"job {job.id} already {job.status}; only queued or running jobs can be canceled",
        status=job.status,
    )


async def cancel_job(request: Request) -> Response:
    job = await _job_or_404(request)
    if job.terminal:
        raise _not_cancelable(job)
    canceled = await host(request).jobs.cancel(job.id)
    if canceled is None:
        raise ApiError(404, f"no job {job.id!r}")
    if canceled.status in ("succeeded", "failed"):
        raise _not_cancelable(canceled)  # it finished between the read and the cancel
    # 202 while a running job still has to reach its next step; 200 once it is canceled.
    return JSONResponse(canceled.to_json(), status_code=200 if canceled.terminal else 202)


async def retry_job(request: Request) -> Response:
    """A failed or canceled job again: a new job with its type, params, priority and webhook
    (or the X-Kiapi-Priority / Cancel-After / X-Kiapi-Webhook of this request), linked both
    ways."""
    job = await _job_or_404(request)
    opts = submit_options(request)
    priority = opts.priority if PRIORITY in request.headers else job.priority
    if job.webhook is not None and opts.webhook_url is None and opts.webhook_events is None:
        hook = WebhookSpec.from_json(job.webhook)
    else:
        hook = await webhook_for(request, opts)
    try:
        new = await host(request).jobs.submit(
            job.type,
            job.params,
            artifact_type=job.artifact_type,  # the original's one-file rule holds for its retry
            priority=priority,
            cancel_after_s=opts.cancel_after_s,
            retry_of=job.id,
            webhook=hook,
            keep_alive_s=opts.keep_alive_s if opts.keep_alive_s is not None else job.keep_alive_s,
        )
    except NoHandler as exc:
        raise ApiError(503, str(exc)) from None
    except NotRetryable as exc:
        if exc.retried_by:
            raise ApiError(
                409,
                f"job {job.id} was already retried as {exc.retried_by}; retry that one",
                status=exc.status,
                retried_by=exc.retried_by,
            ) from None
        raise ApiError(
            409,
            f"job {job.id} is {exc.status}; only failed or canceled jobs can be retried",
            status=exc.status,
        ) from None
    except QueueFull as exc:
        raise ApiError(429, str(exc), headers={"Retry-After": "5"}) from None
    return JSONResponse(new.to_json(), status_code=202, headers={"Location": f"/v1/jobs/{new.id}"})


class PriorityChange(Schema):
    model_config = ConfigDict(extra="forbid")

    priority: int = Field(
        ge=PRIORITY_MIN, le=PRIORITY_MAX, description="Higher runs first; FIFO among equals."
    )


async def patch_job(request: Request) -> Response:
    job = await _job_or_404(request)
    change = await read_json(request, PriorityChange)
    changed = await host(request).jobs.set_priority(job.id, change.priority)
    if changed is None or changed.status != "queued":
        status = changed.status if changed is not None else job.status
        raise ApiError(
            409, f"job {job.id} is {status}; only a queued job's priority can change", status=status
        )
    return JSONResponse(changed.to_json())


def last_event_id(request: Request) -> str | None:
    """Where a reconnecting client resumes: the ``Last-Event-ID`` header (what EventSource
    sends) or ``?last_event_id=`` (for a first connection that resumes)."""
    value = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if value is None or value == "":
        return None
    if not is_event_id(value):
        raise invalid(
            ["header", "Last-Event-ID"],
            f"{value[:64]!r} is not an event id: use the id: of an event this server sent",
            "event_id",
        )
    return value


class EventStreamResponse(StreamingResponse):
    """An SSE response that lets its follower go however the response ends (even when the
    client leaves before the body starts)."""

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream
        super().__init__(
            stream.chunks(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.stream.writer = scope.get("extensions", {}).get(SSE_WRITER)
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close()


async def get_preview(request: Request) -> Response:
    """The job's latest live preview (JPEG or WebP), with an ETag; 404 when it has none."""
    job = await _job_or_404(request)
    preview = None if job.terminal else await host(request).jobs.preview(job.id)
    if preview is None:
        why = (
            f"job {job.id} is {job.status}: previews are dropped when a job ends"
            if job.terminal
            else f"job {job.id} has no preview yet (it is {job.status}; previews come while it"
            " runs, unless turned off by KIAPI_PREVIEWS or the request's `preview: false`)"
        )
        raise ApiError(404, why, status=job.status)
    headers = {"ETag": preview.info.etag, "Cache-Control": "no-cache"}
    if preview.info.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    headers["X-Kiapi-Preview-Step"] = f"{preview.info.step}/{preview.info.steps}"
    return Response(preview.data, media_type=preview.info.media_type, headers=headers)


async def job_events(request: Request) -> Response:
    last = last_event_id(request)
    job = await _job_or_404(request)
    stream = await open_job_stream(host(request).jobs, job, last)
    if stream.empty:
        # Resumed after the job's end: nothing more will come; 204 stops EventSource retrying.
        stream.close()
        return Response(status_code=204)
    return EventStreamResponse(stream)


async def all_events(request: Request) -> Response:
    last = last_event_id(request)
    q = request.query_params
    status = q.get("status") or None
    if status is not None and status not in JobStatus.__members__:
        allowed = ", ".join(JobStatus.__members__)
        raise invalid(["query", "status"], f"must be one of {allowed}", "enum")
    job_type = q.get("type") or None
    if job_type is not None and len(job_type) > 200:
        raise invalid(["query", "type"], "at most 200 characters", "string_too_long")
    stream = await open_all_stream(host(request).jobs, last, job_type, status)
    return EventStreamResponse(stream)


routes = [
    Route("/v1/jobs", list_jobs, methods=["GET"]),
    Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/v1/jobs/{job_id}", cancel_job, methods=["DELETE"]),
    Route("/v1/jobs/{job_id}", patch_job, methods=["PATCH"]),
    Route("/v1/jobs/{job_id}/retry", retry_job, methods=["POST"]),
    Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
    Route("/v1/jobs/{job_id}/preview", get_preview, methods=["GET"]),
    Route("/v1/events", all_events, methods=["GET"]),
]
