"""A job's status and, for a job that did not succeed, the kind of its failure; and the one
mapping from those to the HTTP status every route answers with."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})


class ErrorKind(StrEnum):
    """Why a job did not succeed (the job's ``error_kind``)."""

    invalid_input = "invalid_input"  # the handler refused its input (JobInputError)
    unavailable = "unavailable"  # no model could be loaded (weights, memory)
    timeout = "timeout"  # ran past KIAPI_JOB_TIMEOUT_S
    interrupted = "interrupted"  # the server stopped or restarted under it
    disk_full = "disk_full"  # its output or its end could not be stored
    canceled = "canceled"  # canceled by request
    http_error = "http_error"  # the handler failed it with a status of its own (JobFailed)
    internal = "internal"  # the handler raised anything else


# What a sync request answers when its job failed this way; anything else is a 500.
HTTP_STATUS = {
    ErrorKind.invalid_input: 400,
    ErrorKind.unavailable: 503,
    ErrorKind.timeout: 504,
    ErrorKind.interrupted: 503,
    ErrorKind.disk_full: 507,
    ErrorKind.canceled: 409,
}


def failure_http_status(
    status: str, error_kind: str | None, error_status: int | None = None
) -> int:
    """The HTTP status of a job that ended ``status`` (not succeeded) with ``error_kind``
    (and, for ``http_error``, the status its handler chose)."""
    if status == JobStatus.canceled:
        return HTTP_STATUS[ErrorKind.canceled]
    if error_kind == ErrorKind.http_error:
        return error_status if error_status is not None and 400 <= error_status <= 599 else 500
    try:
        return HTTP_STATUS.get(ErrorKind(error_kind or ""), 500)
    except ValueError:
        return 500
