"""Pure-ASGI guards in front of every route: bearer auth and request-body limits.

Pure ASGI (not BaseHTTPMiddleware) so streamed responses (SSE, downloads) pass straight through.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPEN_PATHS = frozenset({"/health"})
# Routes that speak OpenAI's protocol: their 401 also carries OpenAI's error envelope.
OPENAI_PREFIX = "/v1/images/"


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class BearerAuth:
    """Every route but /health needs ``Authorization: Bearer <KIAPI_API_KEY>``.

    ``basic_paths`` (the playground's static files) also take HTTP Basic with the key as the
    password, and challenge for it, because a browser cannot send a bearer token when it loads
    a page. Data routes never accept Basic: credentials a browser resends on its own would let
    other sites act through it (CSRF); the page sends the bearer token itself.
    """

    def __init__(
        self, app: ASGIApp, api_key: str, basic_paths: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.expected = api_key.encode()
        self.basic_paths = basic_paths

    def _basic_ok(self, token: bytes) -> bool:
        try:
            decoded = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError):
            return False
        _, colon, password = decoded.partition(b":")
        return bool(colon) and hmac.compare_digest(password, self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # WebSockets too: a plugin's WebSocketRoute is a route like any other.
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.strip().partition(b" ")
        # The scheme is case-insensitive (RFC 9110 11.1); compare_digest keeps the comparison
        # time independent of where the token differs.
        token = token.strip()
        scheme = scheme.lower()
        basic = scope["path"] in self.basic_paths
        if token and (
            (scheme == b"bearer" and hmac.compare_digest(token, self.expected))
            or (basic and scheme == b"basic" and self._basic_ok(token))
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            # Closing before accepting refuses the handshake (the client sees HTTP 403).
            await send({"type": "websocket.close", "code": 1008, "reason": "missing or wrong key"})
            return
        detail = (
            "invalid API key" if given else "missing API key"
        ) + ": send the header 'Authorization: Bearer <KIAPI_API_KEY>'"
        headers = [(b"www-authenticate", b'Bearer realm="kiapi"')]
        if basic:
            detail += " (a browser asks for it: any user name, the key as the password)"
            headers.append((b"www-authenticate", b'Basic realm="kiapi", charset="UTF-8"'))
        body: dict[str, Any] = {"detail": detail}
        if scope["path"].startswith(OPENAI_PREFIX):
            body["error"] = {
                "message": detail,
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        await _send_json(send, 401, body, headers)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuse bodies over the limit with 413, from Content-Length up front or while streaming.

    Uploads (``POST /v1/files``) get their own, larger limit.
    """

    def __init__(
        self, app: ASGIApp, max_body: int, max_upload: int, upload_paths: frozenset[str]
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.max_upload = max_upload
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        is_upload = scope["path"] in self.upload_paths
        limit = self.max_upload if is_upload else self.max_body
        setting = "KIAPI_MAX_UPLOAD_BYTES" if is_upload else "KIAPI_MAX_BODY_BYTES"
        detail = f"request body is larger than {limit} bytes ({setting})"
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, {"detail": "Content-Length header is not a number"})
                    return
        if declared is not None and declared > limit:
            await _send_json(send, 413, {"detail": detail}, [(b"connection", b"close")])
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if started:
                raise
            await _send_json(send, 413, {"detail": detail}, [(b"connection", b"close")])
