"""The Job JSON every capability shares (the contract's Job schema, plus ``queue_position``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, create_model

from kiapi_core.jobs.status import TERMINAL, JobStatus
from kiapi_core.web.schema import Schema, optional, untitled

__all__ = ["TERMINAL", "JobStatus"]  # re-exported: the Job schema's enum


class JobID(RootModel[str]):
    model_config = ConfigDict(json_schema_extra=untitled, defer_build=True)


class FileID(RootModel[str]):
    model_config = ConfigDict(json_schema_extra=untitled, defer_build=True)


class JobType(RootModel[str]):
    model_config = ConfigDict(json_schema_extra=untitled, defer_build=True)


class WebhookDelivery(Schema):
    """One event of a job's webhook, and how sending it went."""

    id: str = Field(
        description="The `webhook-id` header of every attempt (receivers dedupe on it)."
    )
    event: Literal["start", "progress", "completed"] = Field(description="What happened.")
    status: Literal["pending", "delivered", "failed"] = Field(
        description="pending until a 2xx answer (delivered) or the last attempt (failed)."
    )
    attempts: int = Field(description="Attempts made so far.")
    last_status_code: int | None = Field(None, description="HTTP status of the last attempt.")
    last_error: str | None = Field(None, description="Why the last attempt failed.")
    next_attempt_at: float | None = Field(None, description="Unix time of the next attempt.")
    delivered_at: float | None = Field(None, description="Unix time it was delivered.")


class JobWebhook(Schema):
    """The job's webhook (X-Kiapi-Webhook, the body's `webhook`, or KIAPI_WEBHOOK_URL)."""

    url: str = Field(description="Where events are POSTed, signed per Standard Webhooks.")
    events: list[Literal["start", "progress", "completed"]] = Field(
        description="The events sent (X-Kiapi-Webhook-Events / `webhook_events_filter`)."
    )
    deliveries: list[WebhookDelivery] | None = Field(
        None, description="The most recent deliveries (at most 20), oldest first."
    )


class Job(Schema):
    """A unit of work: its parameters, lifecycle, progress, result and produced files."""

    type: JobType = Field(description="Job type: which handler runs it (e.g. `ideogram4`).")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Resolved request parameters, recorded so the run can be reproduced.",
    )
    id: JobID = optional("Job id, `job_` + 16 hex digits. Jobs survive server restarts.")
    status: JobStatus = Field(
        JobStatus.queued, description="queued, running, succeeded, failed or canceled."
    )
    result: dict[str, Any] | None = optional(
        "Capability-specific result once succeeded; else null."
    )
    artifacts: list[FileID] = Field(
        default_factory=list,
        description="Files the job produced: GET /v1/files/{file_id} or /download for bytes.",
    )
    error: str | None = optional("Why the job failed or was canceled; null otherwise.")
    created_at: float = optional("Unix time the job was submitted.")
    started_at: float | None = optional("Unix time a worker started it; null while queued.")
    finished_at: float | None = optional("Unix time it reached a terminal state; null before.")
    progress: float | None = optional(
        "Completion fraction in [0, 1]; null before any report.", ge=0.0, le=1.0
    )
    progress_label: str = Field(
        "queued", description="Phase: queued, loading, denoising, decoding, saving, done..."
    )
    queue_position: int | None = optional(
        "kiapi extension: 1-based place in the queue while queued (in claim order: priority,"
        " then submission); null otherwise."
    )
    priority: int = optional(
        "kiapi extension: -10..10, higher runs first (X-Kiapi-Priority; PATCH while queued).",
        ge=-10,
        le=10,
    )
    deadline: float | None = optional(
        "kiapi extension: Unix time set by Cancel-After: not started by then, the job ends"
        " canceled and never runs; still running then, it is canceled at its next step."
    )
    retry_of: str | None = optional(
        "kiapi extension: the failed or canceled job this one retries (POST .../retry)."
    )
    retried_by: str | None = optional("kiapi extension: the job that retries this one.")
    webhook: JobWebhook | None = optional(
        "kiapi extension: the job's webhook and its deliveries; null without one."
    )
    eta_s: float | None = optional(
        "kiapi extension: while running, the estimated seconds left (the handler's own phase"
        " model, else recent run times of this job type and the progress rate); else null.",
        ge=0.0,
    )
    estimated_start_at: float | None = optional(
        "kiapi extension: while queued, the Unix time it is expected to start (from the jobs"
        " running and ahead of it in claim order, their recent run times and the worker"
        " slots); null otherwise or when nothing is known yet."
    )
    keep_alive: float | None = optional(
        "kiapi extension: seconds its model stays loaded once idle after this job"
        " (X-Kiapi-Keep-Alive or the body's `keep_alive`); 0 unloads it after the job, -1 keeps"
        " it until memory is needed or an explicit unload; null: the server's idle TTL."
    )


def typed_job(name: str, result_model: type[BaseModel]) -> type[Job]:
    """A Job whose ``result`` is ``result_model`` (for a capability's OpenAPI)."""
    result: Any = (
        result_model | None,
        optional(f"{result_model.__name__} once succeeded; else null."),
    )
    model: type[Job] = create_model(name, __base__=Job, result=result)
    return model


class AcceptedJob(Job):
    """A sync submit answered early (Prefer): the Job JSON, with ``job_id`` as async has it."""

    job_id: str = Field(description="The job's id again, as in the async answer.")


class AsyncJobResponse(Schema):
    job_id: str = Field(description="Poll GET /v1/jobs/{job_id} for status, progress and result.")
    type: str = Field(description="Job type.")
    status: JobStatus = Field(description="Usually queued; running if a worker took it at once.")


class JobList(Schema):
    jobs: list[Job] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page; null at the end."
    )
