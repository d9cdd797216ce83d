"""``limit`` and ``cursor`` query parameters shared by the list routes."""

from __future__ import annotations

import re

from starlette.datastructures import QueryParams

from kiapi_core.web.errors import invalid

MAX_LIMIT = 500
# ASCII digits only: str.isdigit() also accepts "²" (which int() rejects) and other scripts.
_DIGITS = re.compile(r"[0-9]{1,18}")


def limit_param(q: QueryParams, default: int = 50) -> int:
    raw = q.get("limit")
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIMIT:
        raise invalid(
            ["query", "limit"], f"must be an integer from 1 to {MAX_LIMIT}", "int_parsing"
        )
    return int(raw)


def cursor_param(q: QueryParams) -> int | None:
    raw = q.get("cursor")
    if raw is None:
        return None
    # An empty cursor is refused like any other malformed one (the documented pattern is
    # ^[0-9]{1,18}$): the first page is asked for by leaving the parameter out.
    if not _DIGITS.fullmatch(raw):
        raise invalid(
            ["query", "cursor"],
            "must be a next_cursor value from a previous page; omit it for the first page",
            "cursor",
        )
    return int(raw)
