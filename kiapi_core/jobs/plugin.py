"""Default plugin ``kiapi.jobs``: list, read, cancel and follow jobs (/v1/jobs)."""

from __future__ import annotations

from typing import Any

from starlette.routing import BaseRoute

from kiapi_core.hookspecs import hookimpl
from kiapi_core.jobs.routes import PriorityChange, routes
from kiapi_core.jobs.schemas import AsyncJobResponse, Job, JobList
from kiapi_core.jobs.status import JobStatus
from kiapi_core.jobs.submit import CANCEL_AFTER_PARAM, PRIORITY_PARAM
from kiapi_core.meta.schemas import Error
from kiapi_core.settings import Settings
from kiapi_core.web.openapi import (
    INVALID,
    NOT_FOUND,
    PAGING_PARAMS,
    cached_fragment,
    error_response,
    json_response,
    operation,
    path_param,
    query_param,
)
from kiapi_core.web.schema import components_from, ref

_JOB = [path_param("job_id", "job_0123456789abcdef")]
# The data of an ephemeral `preview` event: the image itself is at GET .../preview.
_PREVIEW_EVENT = {
    "type": "object",
    "properties": {
        "job_id": {"type": "string"},
        "step": {"type": "integer", "minimum": 0},
        "steps": {"type": "integer", "minimum": 0},
        "width": {"type": "integer", "minimum": 1},
        "height": {"type": "integer", "minimum": 1},
        "media_type": {"type": "string", "enum": ["image/jpeg", "image/webp"]},
    },
    "required": ["job_id", "step", "steps", "width", "height", "media_type"],
}
# The data of a `reset` event: the Last-Event-ID asked for is no longer (or never was) kept.
_RESET_EVENT = {
    "type": "object",
    "properties": {"detail": {"type": "string"}, "last_event_id": {"type": "string"}},
    "required": ["detail", "last_event_id"],
}
_EVENT_ID = {
    "type": "string",
    "description": "Opaque, increasing; durable: resume with Last-Event-ID. Events that are not"
    " journaled (a queued job's new place, `preview`) repeat the last durable id.",
}
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["progress", "end", "reset", "preview"]},
        "id": _EVENT_ID,
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [ref("Job"), _PREVIEW_EVENT, _RESET_EVENT]},
            "description": "The Job JSON; for `reset`, `{detail, last_event_id}`; for `preview`, the preview's"
            " step and size (GET /v1/jobs/{job_id}/preview has the image).",
        },
    },
    "required": ["event", "id", "data"],
}
_ALL_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["job", "reset"]},
        "id": _EVENT_ID,
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [ref("Job"), _RESET_EVENT]},
            "description": "The Job JSON right after the change; for `reset`,"
            " `{detail, last_event_id}`.",
        },
    },
    "required": ["event", "id", "data"],
}
_RESUME = [
    {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        # Empty reads as absent: an EventSource whose last event set no id sends nothing else.
        "schema": {"type": "string", "pattern": r"^(\d{1,20}(-\d{1,20})?)?$"},
        "description": "Resume after this event (EventSource sends it on reconnect): exactly"
        " the events after it follow; empty is the same as none. An id older than the journal keeps"
        " (KIAPI_EVENTS_RETAIN) gets `event: reset`, then the current state.",
    },
    query_param(
        "last_event_id",
        {"type": "string"},
        "The same as the Last-Event-ID header, for clients that cannot set it.",
    ),
]
_SSE_HEADERS_422 = error_response("A malformed Last-Event-ID, `status` or `type`.")


def fragment() -> dict[str, Any]:
    jobs_tag = "jobs"
    return {
        "paths": {
            "/v1/jobs": {
                "get": operation(
                    "List jobs, newest first",
                    {"200": json_response(ref("JobList"), "A page of jobs."), "422": INVALID},
                    tag=jobs_tag,
                    parameters=[
                        query_param(
                            "status",
                            {
                                "type": "string",
                                "enum": [s.value for s in JobStatus],
                            },
                            "Only jobs in this state.",
                        ),
                        query_param("type", {"type": "string"}, "Only jobs of this type."),
                        *PAGING_PARAMS,
                    ],
                )
            },
            "/v1/jobs/{job_id}": {
                "get": operation(
                    "A job's status, progress, result and artifacts",
                    {"200": json_response(ref("Job"), "The job."), "404": NOT_FOUND},
                    tag=jobs_tag,
                    parameters=_JOB,
                ),
                "delete": operation(
                    "Cancel a job",
                    {
                        "200": json_response(ref("Job"), "The job was queued and is now canceled."),
                        "202": json_response(
                            ref("Job"),
                            "The job is running; it stops at its next step and ends canceled.",
                        ),
                        "404": NOT_FOUND,
                        "409": error_response("The job already finished; `status` says how."),
                    },
                    tag=jobs_tag,
                    parameters=_JOB,
                ),
                "patch": operation(
                    "Change a queued job's priority",
                    {
                        "200": json_response(ref("Job"), "The job, with its new queue_position."),
                        "404": NOT_FOUND,
                        "409": error_response("The job is no longer queued; `status` says how."),
                        "422": INVALID,
                    },
                    tag=jobs_tag,
                    parameters=_JOB,
                    requestBody={
                        "required": True,
                        "content": {"application/json": {"schema": ref("PriorityChange")}},
                    },
                ),
            },
            "/v1/jobs/{job_id}/retry": {
                "post": operation(
                    "Retry a failed or canceled job",
                    {
                        "202": json_response(
                            ref("Job"),
                            "A new queued job with the same type, params and priority; its"
                            " `retry_of` names this job, whose `retried_by` names it.",
                        ),
                        "404": NOT_FOUND,
                        "409": error_response(
                            "The job is queued, running or succeeded (`status`), or was"
                            " retried already (`retried_by`)."
                        ),
                        "422": INVALID,
                        "429": error_response("Queue full (KIAPI_MAX_QUEUE); see Retry-After."),
                        "503": error_response("No loaded plugin handles the job's type."),
                    },
                    tag=jobs_tag,
                    parameters=[*_JOB, PRIORITY_PARAM, CANCEL_AFTER_PARAM],
                )
            },
            "/v1/jobs/{job_id}/events": {
                "get": operation(
                    "Follow a job as Server-Sent Events",
                    {
                        "200": {
                            "description": (
                                "`event: progress` with the Job JSON at each change (the first"
                                " one: the job as it is now), then `event: end` at a terminal"
                                " state; meanwhile `event: preview` for each live preview (GET"
                                " /v1/jobs/{job_id}/preview has the image). With Last-Event-ID:"
                                " the events after it, then live."
                            ),
                            # The schema of one event (how SSE media types are read, cf.
                            # OpenAPI 3.2 itemSchema): `data` holds the Job as JSON.
                            "content": {"text/event-stream": {"schema": _SSE_EVENT}},
                        },
                        "204": {
                            "description": "Resumed after the job's `end`: nothing more will"
                            " come (EventSource stops reconnecting)."
                        },
                        "404": NOT_FOUND,
                        "422": _SSE_HEADERS_422,
                    },
                    tag=jobs_tag,
                    parameters=[*_JOB, *_RESUME],
                )
            },
            "/v1/events": {
                "get": operation(
                    "Every job's changes as Server-Sent Events (for dashboards)",
                    {
                        "200": {
                            "description": (
                                "`event: job` with the Job JSON at each change of any job (or"
                                " of the jobs the filters select), from now; with"
                                " Last-Event-ID, from after that event."
                            ),
                            "content": {"text/event-stream": {"schema": _ALL_EVENT}},
                        },
                        "422": _SSE_HEADERS_422,
                    },
                    tag=jobs_tag,
                    parameters=[
                        query_param(
                            "status",
                            {"type": "string", "enum": [s.value for s in JobStatus]},
                            "Only changes that leave a job in this state.",
                        ),
                        query_param("type", {"type": "string"}, "Only jobs of this type."),
                        *_RESUME,
                    ],
                )
            },
            "/v1/jobs/{job_id}/preview": {
                "get": operation(
                    "A running job's latest live preview",
                    {
                        "200": {
                            "description": (
                                "The latest preview image (longest side <= 256 px), replaced as"
                                " the job goes on; never an artifact. `ETag` names it;"
                                " `X-Kiapi-Preview-Step` says `step/steps`."
                            ),
                            "headers": {
                                "ETag": {"schema": {"type": "string"}},
                                "Cache-Control": {
                                    "schema": {"type": "string", "enum": ["no-cache"]}
                                },
                            },
                            "content": {
                                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                                "image/webp": {"schema": {"type": "string", "format": "binary"}},
                            },
                        },
                        "304": {"description": "If-None-Match names the latest preview."},
                        "404": error_response(
                            "No such job, or it has no preview: not running yet, ended (previews"
                            " are dropped then), or previews are off (KIAPI_PREVIEWS, or the"
                            " request's `preview: false`)."
                        ),
                    },
                    tag=jobs_tag,
                    parameters=[
                        *_JOB,
                        {
                            "name": "If-None-Match",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "An ETag seen before: 304 while it is still the latest.",
                        },
                    ],
                )
            },
        },
        "components": {
            "schemas": components_from(Error, Job, JobList, AsyncJobResponse, PriorityChange)
        },
    }


@hookimpl
def register_routes(settings: Settings) -> list[BaseRoute]:
    return list(routes)


@hookimpl
def register_openapi() -> dict[str, Any]:
    return cached_fragment("kiapi.jobs", fragment, packages=["kiapi_core"])
