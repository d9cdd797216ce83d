"""Every error leaves as JSON ``{"detail": ...}`` that names the field, the rule, and the fix."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from kiapi_core.jobs.errors import JobFailed
from kiapi_core.state.diskfull import DISK_FULL_DETAIL, is_disk_full
from kiapi_core.state.sqlite import StoreBusy, is_busy

log = logging.getLogger("kiapi.errors")


class ApiError(JobFailed):
    """Raise from any route to answer ``status`` with ``{"detail": detail, **extra}``.

    Raised inside a job handler it fails the job with that status, as ``JobFailed`` does.
    """

    # Positional-only, so ``extra`` may itself carry a ``status`` or ``detail`` field
    # (e.g. a job's status in a 409) without clashing with the parameters.
    def __init__(
        self, status: int, detail: Any, /, *, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        # Not JobFailed's check: a route may answer any status this way.
        Exception.__init__(self, detail if isinstance(detail, str) else repr(detail))
        self.status = status
        self.detail = detail
        self.headers = headers
        self.extra = extra


def error_response(
    status: int, detail: Any, headers: dict[str, str] | None = None, /, **extra: Any
) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


def validation_detail(
    exc: ValidationError, prefix: tuple[str | int, ...] = ("body",)
) -> list[dict[str, Any]]:
    """pydantic errors as ``[{loc, msg, type}]`` with ``loc`` rooted at the request part."""
    out = []
    for err in exc.errors(include_url=False, include_context=False, include_input=False):
        out.append({"loc": [*prefix, *err["loc"]], "msg": err["msg"], "type": err["type"]})
    return out


def invalid(loc: list[str | int], msg: str, type_: str = "value_error") -> ApiError:
    """A 422 for one field, shaped like pydantic's."""
    return ApiError(422, [{"loc": loc, "msg": msg, "type": type_}])


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.detail, exc.headers, **exc.extra)


_STATUS_HINTS = {
    404: "not found: no route matches {path}; see GET /openapi.json for the API",
    405: "method {method} is not allowed on {path}",
}


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path.

    Starlette's 405 lists only the first route whose path matched, but kiapi registers one
    route per method (``GET`` and ``DELETE /v1/jobs/{job_id}`` are two), so its ``Allow``
    would leave methods out; RFC 9110 wants all of the resource's methods there.
    """
    methods: set[str] = set()
    for route in getattr(request.app, "routes", ()):
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(request.scope)
            if match is not Match.NONE:
                methods |= route.methods
    return sorted(methods)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail: Any = exc.detail
    hint = _STATUS_HINTS.get(exc.status_code)
    if hint and detail in ("Not Found", "Method Not Allowed"):
        detail = hint.format(path=request.url.path, method=request.method)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    headers = dict(exc.headers or {})
    if exc.status_code == 405 and (allowed := _allowed_methods(request)):
        headers["Allow"] = ", ".join(allowed)
        detail = f"{detail}; allowed: {headers['Allow']}"
    return error_response(exc.status_code, detail, headers)


async def _store_busy(request: Request, exc: Exception) -> Response:
    # Reached by a store call made on the loop without Database.call, which never waits.
    detail = str(exc) if isinstance(exc, StoreBusy) else str(StoreBusy())
    return error_response(503, detail, {"Retry-After": "1"})


async def _unhandled(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal server error; the server log has the details")


def disk_full_error() -> ApiError:
    """507 Insufficient Storage: what any request that could not store something answers."""
    return ApiError(507, DISK_FULL_DETAIL)


async def _storage_error(request: Request, exc: Exception) -> Response:
    # The one place a full disk (SQLITE_FULL, ENOSPC), wherever a route met it, becomes 507.
    if is_busy(exc):
        return await _store_busy(request, exc)
    if is_disk_full(exc):
        log.error("disk full on %s %s: %s", request.method, request.url.path, exc)
        return await _api_error(request, disk_full_error())
    return await _unhandled(request, exc)


exception_handlers = {
    ApiError: _api_error,
    HTTPException: _http_error,
    sqlite3.Error: _storage_error,
    OSError: _storage_error,
    StoreBusy: _store_busy,
    Exception: _unhandled,
}
