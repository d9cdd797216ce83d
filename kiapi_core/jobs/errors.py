"""Exceptions a handler raises to end its job with a specific meaning."""

from __future__ import annotations

from typing import Any


class JobInputError(Exception):
    """The request was wrong in a way only the handler could see (e.g. a strict caption check).

    The job fails with this message; a sync request gets it as a 400 with ``detail``.
    """

    def __init__(self, message: str, *, detail: Any = None) -> None:
        super().__init__(message)
        self.detail = detail if detail is not None else message
