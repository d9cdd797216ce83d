"""``GET /v1/jobs/{id}``, the route clients poll, answered ahead of Starlette's router.

Under load most of a poll's cost was plumbing, not the read: matching the path against every
route, the exception-handling wrappers, a Request and a JSONResponse per call, and encoding the
same Job JSON again (bench/throughput.py, docs/performance.md). This layer sits innermost of
kiapi's middleware (after CORS, auth and the body limit, which still apply) and answers a 200
for an existing job itself, with the very bytes and headers the route would send. Anything
else (HEAD, a malformed or unknown id, a root path) goes on to the router unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from kiapi_core.ids import is_job_id
from kiapi_core.jobs.service import JobService

PREFIX = "/v1/jobs/"
_PREFIX_LEN = len(PREFIX)
_TERMINAL = frozenset({"succeeded", "failed", "canceled"})
# Encoded Job JSON of finished jobs, by id; cleared whole when full (a poll re-encodes once).
_CACHE_MAX = 4096


class JobReads:
    """Serves ``GET /v1/jobs/{job_id}`` with ``jobs.get``, as the route does.

    A finished job's JSON bytes are kept with the JSON value they encode and reused while a
    read gives an equal value: nothing that changes the answer (a hand-edited row, a webhook
    delivery) can be served stale, and a poll skips only the encoding. Queued and running
    jobs carry time-dependent fields (eta_s, queue_position), so they are encoded every time.
    """

    def __init__(
        self, app: ASGIApp, jobs: JobService, handlers: dict[Any, Any] | None = None
    ) -> None:
        self.app = app
        self.jobs = jobs
        self.handlers = handlers or {}
        self._encoded: dict[str, tuple[dict[str, Any], bytes]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"] if scope["type"] == "http" else ""
        if (
            not path.startswith(PREFIX)
            or scope["method"] != "GET"
            or scope.get("root_path")
            or not is_job_id(job_id := path[_PREFIX_LEN:])
        ):
            await self.app(scope, receive, send)
            return
        try:
            job = await self.jobs.get(job_id)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            response = await handler(Request(scope, receive), exc)
            await response(scope, receive, send)
            return
        if job is None:
            await self.app(scope, receive, send)  # the route's 404, word for word
            return
        value = job.to_json()
        if job.status in _TERMINAL:
            hit = self._encoded.get(job_id)
            if hit is not None and hit[0] == value:
                body = hit[1]
            else:
                body = _encode(value)
                if len(self._encoded) >= _CACHE_MAX:
                    self._encoded.clear()
                self._encoded[job_id] = (value, body)
        else:
            body = _encode(value)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", b"%d" % len(body)),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _handler(self, exc: Exception) -> Any:
        """What the app's exception handlers would answer ``exc`` with (None: re-raise, so the
        outermost layer logs it and answers 500 as for any route)."""
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            if cls in self.handlers:
                return self.handlers[cls]
        return None


# Starlette's JSONResponse encoding, built once.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _encode(value: dict[str, Any]) -> bytes:
    return _ENCODER.encode(value).encode()
