"""Exceptions a handler raises to end its job with a specific meaning."""

from __future__ import annotations

from typing import Any


class JobFailed(Exception):
    """End the job ``failed`` with an HTTP status of the handler's choosing and a ``detail``.

    ``raise JobFailed(404, "no card named 'x'")``: a sync request gets that status with
    ``{"detail": ...}``; the Job JSON's ``error`` holds the message (``detail`` as JSON when it
    is not a string) and its ``result`` ``{"detail": ...}``. ``status`` must be 400-599; the
    status is stored with the job. ``ApiError`` (what routes raise) is one too.
    """

    def __init__(self, status: int, detail: Any) -> None:
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError(
                f"JobFailed status must be an HTTP error status (400-599), not {status!r}"
            )
        super().__init__(detail if isinstance(detail, str) else repr(detail))
        self.status = status
        self.detail = detail


class JobInputError(Exception):
    """The request was wrong in a way only the handler could see (e.g. a strict caption check).

    The job fails with this message; a sync request gets it as a 400 with ``detail``.
    """

    def __init__(self, message: str, *, detail: Any = None) -> None:
        super().__init__(message)
        self.detail = detail if detail is not None else message
