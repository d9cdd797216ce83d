"""Recognising a full disk, whichever layer noticed it (SQLite, a file write, a plugin).

A full disk is not a bug: requests that would store something answer 507 and jobs that could
not record their end fail with ``DISK_FULL_ERROR`` once space allows (kiapi_core/runtime/threads.py).
"""

from __future__ import annotations

import errno
import sqlite3

# What a job that ran out of disk says; no server path, and what to do about it.
DISK_FULL_ERROR = (
    "disk full: the server ran out of disk space for this job's state or files;"
    " free space (DELETE /v1/files/{id} removes a stored file) and submit it again"
)
DISK_FULL_DETAIL = (
    "the server's disk is full, nothing was stored; free space (DELETE /v1/files/{id}"
    " removes a stored file) and retry"
)

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException | None) -> bool:
    """True if ``exc``, or what it was raised ``from``, is SQLITE_FULL or ENOSPC/EDQUOT."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlite3.Error) and (
            getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or "database or disk is full" in str(exc)
        ):
            return True
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        # Not __context__: an unrelated error raised while handling a full disk is not one.
        exc = exc.__cause__
    return False
