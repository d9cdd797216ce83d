"""uvicorn's httptools protocol with the limits it lacks: a header-read timeout, a header size
and count limit (431) and a cap on open connections.

uvicorn arms its keep-alive timer only after a response, so a connection that never sends a
request (or sends half a head) stays open forever; httptools has no header size limit and
appends a never-ending header to one growing ``bytes`` (unbounded memory, quadratic time);
``limit_concurrency`` answers 503 only once a request head is complete, after the connection
already holds a file descriptor, so idle connections still exhaust the fd limit.

The checks stay off the hot path: a request whose head arrives in one read arms no timer of
its own and costs two comparisons.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
import weakref
from typing import Any, cast

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from kiapi_core.settings import Settings

log = logging.getLogger("kiapi")

# A refused head is answered, then the rest of what the client is still sending is read and
# dropped for a moment: closing with unread data makes the kernel send a reset, which can
# destroy the answer before the client reads it.
_LINGER_S = 2.0
_LINGER_BYTES = 8 * 1024 * 1024
_REFUSAL_LOG_INTERVAL_S = 10.0
# File descriptors a connection may hold (its socket, a file it uploads or downloads), and
# what the rest of the server needs (database, worker pipes, logs, model weights).
_FDS_PER_CONNECTION = 2
_FDS_RESERVED = 64


# The scope extension holding a body writer: ``write(framed) -> bool`` puts an already
# chunk-framed piece of the response body on the socket at once, or returns False (the
# response is not chunked, or ended, or the client is not reading: the caller falls back to
# ASGI ``send``, which waits). Only for responses no middleware rewrites (text/event-stream).
SSE_WRITER = "kiapi.body_writer"


class _BodyWriter:
    """The SSE_WRITER of one request. It holds its cycle weakly: the cycle's scope holds the
    writer, and that reference cycle kept every request's objects alive until the garbage
    collector ran, which cost 15% of the requests/s a bare app serves (bench/throughput.py)."""

    __slots__ = ("_cycle",)

    def __init__(self, cycle: Any) -> None:
        self._cycle = weakref.ref(cycle)

    def __call__(self, framed: bytes) -> bool:
        cycle = self._cycle()
        if (
            cycle is None
            or cycle.chunked_encoding is not True
            or cycle.response_complete
            or cycle.disconnected
            or cycle.flow.write_paused
        ):
            return False
        cycle.transport.write(framed)
        return True


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a request head that breaks a limit."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class _RefusalLog:
    """One log line per interval for refused connections, however many there are."""

    def __init__(self) -> None:
        self.suppressed = 0
        self.quiet_until = 0.0

    def refused(self, loop: asyncio.AbstractEventLoop, open_now: int, cap: int) -> None:
        now = time.monotonic()
        if now < self.quiet_until:
            self.suppressed += 1
            return
        self.quiet_until = now + _REFUSAL_LOG_INTERVAL_S
        log.warning(
            "refusing connections: %d open, KIAPI_MAX_CONNECTIONS=%d; further refusals are"
            " counted and reported every %.0f s",
            open_now,
            cap,
            _REFUSAL_LOG_INTERVAL_S,
        )
        loop.call_later(_REFUSAL_LOG_INTERVAL_S, self._report, cap)

    def _report(self, cap: int) -> None:
        if self.suppressed:
            log.warning(
                "refused %d more connection(s) in the last %.0f s (KIAPI_MAX_CONNECTIONS=%d)",
                self.suppressed,
                _REFUSAL_LOG_INTERVAL_S,
                cap,
            )
            self.suppressed = 0


def _canned(status: int, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """Limits are class attributes, set by :func:`protocol_class` for one server."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 65_536
    max_headers: int = 100
    max_connections: int = 1000
    refusals: _RefusalLog = _RefusalLog()
    too_many_connections: bytes = b""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        # True from the first byte of a request head until its headers are complete.
        self._head_open = False
        # Bytes of the open head seen in earlier reads (an upper bound: a read that starts a
        # head may also end the previous request), and the size of the read being parsed.
        self._head_bytes = 0
        self._chunk_len = 0
        self._lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self.transport = transport
            self._lingering = True  # nothing it sends is parsed
            self.refusals.refused(self.loop, len(self.connections), self.max_connections)
            transport.write(self.too_many_connections)
            transport.close()
            return
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            # The answer is out: what the client still sends is dropped, up to a bound.
            self._head_bytes += len(data)
            if self._head_bytes > _LINGER_BYTES:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        self._chunk_len = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadRefused):
                self._refuse_head(431, exc.__context__.detail)
            else:
                self._invalid_request()
            return
        except httptools.HttpParserError:
            self._invalid_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._head_open:
            # The head goes on past this read: bound its size now, as httptools keeps the
            # unfinished header in memory, and give it a deadline if it has none yet.
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse_head(431, self._too_large())
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = True

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        if (
            self._head_bytes + self._chunk_len > self.max_header_bytes
            and len(self.url) + sum(len(n) + len(v) for n, v in self.headers)
            > self.max_header_bytes
        ):
            raise _HeadRefused(self._too_large())
        if len(self.headers) > self.max_headers:
            raise _HeadRefused(
                f"request header fields too large: {len(self.headers)} header fields, more"
                f" than KIAPI_MAX_HEADERS={self.max_headers}"
            )
        self._head_open = False
        self._head_bytes = 0
        super().on_headers_complete()
        # For SSE fan-out (jobs/fanout.py): a stream's live events go straight to the socket.
        extensions = cast("dict[str, Any]", self.scope.setdefault("extensions", {}))
        extensions[SSE_WRITER] = _BodyWriter(self.cycle)

    def _too_large(self) -> str:
        return (
            "request header fields too large: the request line and headers exceed"
            f" KIAPI_MAX_HEADER_BYTES={self.max_header_bytes} bytes"
        )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_open and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(
                _canned(
                    408,
                    "request head not complete within"
                    f" KIAPI_HEADER_TIMEOUT_S={self.header_timeout_s:g} s",
                )
            )
        # A connection that never sent a byte, or one with a response still streaming
        # (a pipelined head behind it stalled), is closed without an answer.
        self.transport.close()

    def _invalid_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    def _refuse_head(self, status: int, detail: str) -> None:
        self._cancel_head_timer()
        self._head_open = False
        self._lingering = True
        self._head_bytes = 0
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a response still being sent: an answer now would land
            # inside that response.
            self.transport.close()
            return
        self.transport.write(_canned(status, detail))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(_LINGER_S, self.transport.close)
        else:
            self.transport.close()


def _fit_to_fd_limit(wanted: int) -> int:
    """The connection cap the open-files limit can hold, raising the soft limit if needed."""
    need = wanted * _FDS_PER_CONNECTION + _FDS_RESERVED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # e.g. macOS refuses more than OPEN_MAX: keep what we have
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    fitted = max(1, (soft - _FDS_RESERVED) // _FDS_PER_CONNECTION)
    log.warning(
        "KIAPI_MAX_CONNECTIONS=%d needs %d open files but the limit is %d: capping"
        " connections at %d (raise `ulimit -n` to allow more)",
        wanted,
        need,
        soft,
        fitted,
    )
    return fitted


def protocol_class(settings: Settings) -> type[LimitedHttpToolsProtocol]:
    """uvicorn's ``http`` protocol for one server, with ``settings``' limits."""
    cap = _fit_to_fd_limit(settings.max_connections)
    attrs: dict[str, Any] = {
        "header_timeout_s": settings.header_timeout_s,
        "max_header_bytes": settings.max_header_bytes,
        "max_headers": settings.max_headers,
        "max_connections": cap,
        "refusals": _RefusalLog(),
        "too_many_connections": _canned(
            503, f"too many open connections (KIAPI_MAX_CONNECTIONS={cap}); retry later"
        ),
    }
    return type("KiapiHttpProtocol", (LimitedHttpToolsProtocol,), attrs)
