"""CORS for the origins in KIAPI_CORS_ORIGINS, and not a single CORS header for any other."""

from __future__ import annotations

import json

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import Message, Send


class ListedOriginsCORS(CORSMiddleware):
    """Starlette's CORSMiddleware, except that an origin not listed gets no ``Access-Control-*``
    header at all.

    Starlette adds ``Access-Control-Expose-Headers`` to every response to a request with an
    ``Origin``, listed or not, and its 400 to a refused preflight carries the allowed methods,
    the requested headers and a max age. Such an answer tells a stranger's page what the
    server would allow. ``Vary: Origin`` stays: the answer does depend on the origin, and a
    cache must not hand a listed origin's answer to another one.
    """

    def preflight_response(self, request_headers: Headers) -> Response:
        origin = request_headers["origin"]
        if self.is_allowed_origin(origin):
            return super().preflight_response(request_headers)
        body = {
            "detail": f"CORS preflight refused: origin {origin[:200]!r} is not in"
            " KIAPI_CORS_ORIGINS"
        }
        return Response(
            json.dumps(body),
            status_code=400,
            media_type="application/json",
            headers={"Vary": self.preflight_headers["Vary"]},
        )

    async def send(self, message: Message, send: Send, request_headers: Headers) -> None:
        if message["type"] == "http.response.start":
            origin = request_headers.get("origin")
            if origin is not None and not self.is_allowed_origin(origin):
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                headers["Vary"] = ", ".join([*headers.getlist("Vary"), "Origin"])
                await send(message)
                return
        await super().send(message, send, request_headers)
