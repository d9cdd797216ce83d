"""Running one claimed job's handler: the one job-execution function every runtime shares.

``perform`` calls the handler inside its error handling and classifies what happened into an
``Outcome``; it writes nothing. Where the job runs (a thread of the server, the worker process,
a ``kiapi worker``) and how its end is recorded is the runtime's business
(``WorkerPool.record``, or a runtime's own ending such as the celery worker's hand-back).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from kiapi_core.jobs.context import (
    JobCanceled,
    JobContext,
    JobDeadlinePassed,
    JobHandler,
    JobInterrupted,
    JobTimedOut,
)
from kiapi_core.jobs.errors import JobFailed, JobInputError
from kiapi_core.jobs.status import ErrorKind, JobStatus
from kiapi_core.jobs.store import (
    DAMAGED_ERROR,
    DamagedRecord,
    JobRecord,
    NotStrictJson,
    strict_dumps,
)
from kiapi_core.models.manager import ModelUnavailable
from kiapi_core.state.diskfull import DISK_FULL_ERROR, is_disk_full

log = logging.getLogger("kiapi.worker")


class ResultTooLarge(Exception):
    """A handler's result is over KIAPI_MAX_RESULT_BYTES."""


class ArtifactCountWrong(Exception):
    """A job declared to save exactly one file (its route answers with it) saved another number."""


# An absolute filesystem path (two parts or more) in an exception's message: where the
# server's home, a plugin's files or a user's name are, none of them the client's business.
_PATH = re.compile(r"(?<![\w:/.~-])~?/(?:[^\s'\"`/()<>,;:]+/)+[^\s'\"`/()<>,;:]*")


def without_paths(message: str) -> str:
    """``message`` with each absolute filesystem path replaced by ``<path>`` (the server log
    keeps the original)."""
    return _PATH.sub("<path>", message)


def check_result_size(text: str, limit: int) -> None:
    """``text``: the result as JSON. Every read of the job (status, lists, events, the
    worker's pipe) carries it."""
    size = len(text) if text.isascii() else len(text.encode())
    if size > limit:
        raise ResultTooLarge(
            f"the handler's result is {size:,} bytes of JSON, over KIAPI_MAX_RESULT_BYTES="
            f"{limit}; large outputs belong in files (ctx.save_file)"
        )


@dataclass
class Outcome:
    """How a run ended, before anything is written."""

    status: JobStatus
    result: dict[str, Any] | None = None
    error: str | None = None
    kind: ErrorKind | None = None
    http_status: int | None = None  # for ErrorKind.http_error: the status the handler chose

    def fail(self, kind: ErrorKind, error: str) -> None:
        self.status, self.kind, self.error, self.result = JobStatus.failed, kind, error, None
        self.http_status = None

    @property
    def stored_result(self) -> dict[str, Any] | None:
        """What the job's ``result`` holds: the handler's, or a refused input's detail."""
        keep = self.status == JobStatus.succeeded or self.kind in (
            ErrorKind.invalid_input,
            ErrorKind.http_error,
        )
        return self.result if keep else None


def perform(
    job: JobRecord, handler: JobHandler | None, ctx: JobContext, max_result_bytes: int
) -> Outcome:
    """Run ``handler(ctx)`` for ``job`` and say how it went; never raises."""
    try:
        if job.damage is not None:
            raise DamagedRecord(f"{DAMAGED_ERROR} ({job.damage}); it cannot run")
        if handler is None:
            return Outcome(
                JobStatus.failed, error=unhandled_error(job.type), kind=ErrorKind.unavailable
            )
        result = handler(ctx)
        if not isinstance(result, dict):
            raise TypeError(f"handler for {job.type!r} returned {type(result).__name__}, not dict")
        if job.artifact_type is not None and len(ctx.artifacts) != 1:
            raise ArtifactCountWrong(
                f"the {job.type!r} handler saved {len(ctx.artifacts)} files, but this job must"
                f" save exactly one ({job.artifact_type}): its route answers with that file"
                " itself; save one file, or answer with the Job JSON"
            )
        # Fail here, clearly, rather than in the store or in every answer that shows it.
        text = strict_dumps(result, f"the result of the {job.type!r} handler")
        check_result_size(text, max_result_bytes)
        return Outcome(JobStatus.succeeded, result)
    except JobTimedOut as exc:
        return Outcome(JobStatus.failed, error=str(exc), kind=ErrorKind.timeout)
    except JobInterrupted as exc:
        return Outcome(JobStatus.failed, error=str(exc), kind=ErrorKind.interrupted)
    except JobDeadlinePassed as exc:
        return Outcome(JobStatus.canceled, error=str(exc), kind=ErrorKind.canceled)
    except JobCanceled:
        return Outcome(JobStatus.canceled, error="canceled by request", kind=ErrorKind.canceled)
    except JobInputError as exc:
        outcome = Outcome(
            JobStatus.failed, {"detail": exc.detail}, str(exc), ErrorKind.invalid_input
        )
        try:
            strict_dumps(outcome.result, "the detail of its JobInputError")
        except NotStrictJson as bad:
            outcome.error, outcome.result = f"{outcome.error}; {bad}", None
        return outcome
    except JobFailed as exc:
        detail = exc.detail
        try:
            error = detail if isinstance(detail, str) else strict_dumps(detail, "its detail")
        except NotStrictJson as bad:
            error, detail = f"{exc}; {bad}", f"{exc}; {bad}"
        return Outcome(
            JobStatus.failed, {"detail": detail}, error, ErrorKind.http_error, exc.status
        )
    except ModelUnavailable as exc:
        return Outcome(JobStatus.failed, error=str(exc), kind=ErrorKind.unavailable)
    except (ResultTooLarge, ArtifactCountWrong) as exc:
        log.error("job %s (%s) failed: %s", job.id, job.type, exc)
        return Outcome(JobStatus.failed, error=str(exc), kind=ErrorKind.internal)
    except BaseException as exc:
        if is_disk_full(exc):
            log.error("job %s (%s) failed: the disk is full (%s)", job.id, job.type, exc)
            return Outcome(JobStatus.failed, error=DISK_FULL_ERROR, kind=ErrorKind.disk_full)
        # BaseException too: a handler calling sys.exit() must not kill its worker thread and
        # leave its job "running" forever.
        log.exception("job %s (%s) failed", job.id, job.type)
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return Outcome(JobStatus.failed, error=without_paths(error), kind=ErrorKind.internal)


def unhandled_error(job_type: str) -> str:
    return (
        f"no loaded plugin handles job type {job_type!r}: the plugin that runs these jobs is"
        " not loaded here (uninstalled, left out by KIAPI_PLUGINS/KIAPI_DISABLE_PLUGINS, or"
        " failed to load: see GET /health)"
    )
