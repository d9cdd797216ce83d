"""Connection and header limits of ``kiapi serve``, on a real server with raw sockets: a head
that does not arrive in time is closed, an oversized or over-counted head is answered 431, an
endless header is cut off without the server's memory growing, and connections beyond the cap
are refused; while keep-alive, uploads and long-lived SSE streams keep working.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from helpers import LiveServer, free_port, wait_for

from kiapi_core.testing import kiapi_command

HEALTH = b"GET /health HTTP/1.1\r\nHost: kiapi\r\n\r\n"
ECHO = "/v1/text/echo/run"


def _connect(server: LiveServer) -> socket.socket:
    url = urlsplit(server.url)
    return socket.create_connection((url.hostname, url.port), timeout=30)


def _until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    start = time.monotonic()
    data = b""
    sock.settimeout(timeout)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"still open after {timeout}s; got {data[:200]!r}") from None
    except ConnectionResetError:
        pass
    return data, time.monotonic() - start


def _one_response(sock: socket.socket) -> bytes:
    """One complete response with a Content-Length, read off a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(v for k, v in _headers(head) if k == b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _headers(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(b":") for line in lines)]


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _rss_mb(server: LiveServer) -> float:
    with open(f"/proc/{server.proc.pid}/status") as fh:
        line = next(line for line in fh if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


# -- header-read timeout -------------------------------------------------------------------
def test_idle_and_slow_heads_are_closed(live_server: Callable[..., LiveServer]) -> None:
    server = live_server({"KIAPI_PLUGINS": "echo", "KIAPI_HEADER_TIMEOUT_S": "1"})
    idle, half, drip, later, kept = (_connect(server) for _ in range(5))
    # An idle keep-alive connection is closed by uvicorn's keep-alive timeout (5 s).
    kept.sendall(HEALTH)
    assert _status(_one_response(kept)) == 200
    half.sendall(b"GET /health HTTP/1.1\r\nHost: kiapi\r\nX-Half: ")
    # A keep-alive connection that starts its second request and stops halfway: uvicorn's
    # keep-alive timer is cancelled by the first byte, so only the header timeout closes it.
    later.sendall(HEALTH)
    assert _status(_one_response(later)) == 200
    later.sendall(b"GET /health HTTP/1.1\r\nHo")
    # A client trickling its head a byte at a time does not extend the deadline.
    drip.sendall(b"GET /health HTTP/1.1\r\n")
    deadline = time.monotonic() + 30
    dripped: float | None = None
    while time.monotonic() < deadline:
        try:
            drip.sendall(b"X")
        except OSError:
            dripped = time.monotonic() - (deadline - 30)
            break
        time.sleep(0.2)
    assert dripped is not None and dripped < 20, "a dripping head was never closed"

    for sock in (idle, kept):
        data, _ = _until_closed(sock, 20)
        assert data == b""  # nothing was asked, nothing is answered
    for sock in (half, later):
        data, _ = _until_closed(sock, 20)
        assert _status(data) == 408 and b"KIAPI_HEADER_TIMEOUT_S=1" in data
    for sock in (idle, half, drip, later, kept):
        sock.close()
    assert httpx.get(server.url + "/health").status_code == 200


def test_keep_alive_and_long_streams_outlive_the_header_timeout(
    live_server: Callable[..., LiveServer],
) -> None:
    server = live_server({"KIAPI_PLUGINS": "echo", "KIAPI_HEADER_TIMEOUT_S": "1"})
    # Requests on one connection spaced past the header timeout (within keep-alive's 5 s).
    sock = _connect(server)
    for _ in range(3):
        sock.sendall(HEALTH)
        assert _status(_one_response(sock)) == 200
        time.sleep(1.5)
    sock.close()
    # An SSE stream runs well past the header timeout (the timeout covers the head only).
    with server.client() as c:
        job = c.post(ECHO, json={"text": "hi", "steps": 40, "delay_s": 0.1, "mode": "async"})
        assert job.status_code == 202, job.text
        start = time.monotonic()
        events: list[str] = []
        with c.stream("GET", f"/v1/jobs/{job.json()['job_id']}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    events.append(line.removeprefix("event: "))
                    if events[-1] == "end":
                        break
        assert events[-1] == "end" and time.monotonic() - start > 2.5
        # A slow upload: the head is in time, the body trickles in past the header timeout.
        boundary = b"kiapi-boundary"
        body = (
            b"--" + boundary + b"\r\n"
            b'Content-Disposition: form-data; name="file"; filename="a.bin"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + b"x" * 300_000 + b"\r\n"
            b"--" + boundary + b"--\r\n"
        )

        def slowly() -> Iterator[bytes]:
            for i in range(0, len(body), 100_000):
                yield body[i : i + 100_000]
                time.sleep(0.8)

        up = c.post(
            "/v1/files",
            content=slowly(),
            headers={"content-type": f"multipart/form-data; boundary={boundary.decode()}"},
        )
        assert up.status_code == 201, up.text
        assert up.json()["bytes"] == 300_000


# -- header size and count -----------------------------------------------------------------
def test_oversized_and_overcounted_heads_get_431(live_server: Callable[..., LiveServer]) -> None:
    server = live_server({"KIAPI_PLUGINS": "echo"})  # defaults: 64 KiB, 100 fields

    def answer(head: bytes) -> bytes:
        sock = _connect(server)
        try:
            sock.sendall(head)
            data, _ = _until_closed(sock, 20)
            return data
        finally:
            sock.close()

    big = answer(b"GET /health HTTP/1.1\r\nHost: kiapi\r\nX-Big: " + b"a" * 2_000_000 + b"\r\n\r\n")
    assert _status(big) == 431, big[:200]
    assert b'"detail"' in big and b"KIAPI_MAX_HEADER_BYTES=65536" in big
    many = b"".join(b"X-%d: v\r\n" % i for i in range(101))
    counted = answer(b"GET /health HTTP/1.1\r\nHost: kiapi\r\n" + many + b"\r\n")
    assert _status(counted) == 431 and b"KIAPI_MAX_HEADERS=100" in counted
    flood = b"".join(b"X-%d: v\r\n" % i for i in range(100_000))
    assert _status(answer(b"GET /health HTTP/1.1\r\nHost: kiapi\r\n" + flood + b"\r\n")) == 431
    # Within the limits all is well: a 60 KB cookie, 90 fields.
    with server.client() as c:
        assert c.get("/health", headers={"cookie": "a=" + "b" * 60_000}).status_code == 200
        assert c.get("/health", headers={f"x-{i}": "v" for i in range(90)}).status_code == 200
        # An upload whose head and first body bytes arrive together is not mistaken for a
        # huge head.
        up = c.post("/v1/files", files={"file": ("a.bin", b"y" * 500_000)})
        assert up.status_code == 201, up.text


def test_an_endless_header_is_cut_off(live_server: Callable[..., LiveServer]) -> None:
    server = live_server({"KIAPI_PLUGINS": "echo"})
    before = _rss_mb(server)
    sock = _connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: kiapi\r\nX-Endless: ")
    sent = 0
    chunk = b"a" * 1_000_000
    with pytest.raises(OSError):  # the server closes on it: a reset or a broken pipe
        while sent < 200_000_000:
            sock.sendall(chunk)
            sent += len(chunk)
    sock.close()
    assert sent < 64_000_000, f"the server read {sent} bytes of one header"
    assert _rss_mb(server) - before < 32
    assert httpx.get(server.url + "/health").status_code == 200


# -- connection cap --------------------------------------------------------------------------
def test_connections_beyond_the_cap_are_refused(live_server: Callable[..., LiveServer]) -> None:
    cap = 20
    server = live_server(
        {
            "KIAPI_PLUGINS": "echo",
            "KIAPI_MAX_CONNECTIONS": str(cap),
            "KIAPI_HEADER_TIMEOUT_S": "120",
        }
    )
    held = [_connect(server) for _ in range(cap)]
    try:
        # The server accepts in order: once it refuses one, it has accepted all held ones.
        for _ in range(30):
            extra = _connect(server)
            data, took = _until_closed(extra, 20)
            extra.close()
            assert _status(data) == 503 and b"KIAPI_MAX_CONNECTIONS=20" in data
            assert took < 10
        # The held connections are served normally.
        held[0].sendall(HEALTH)
        assert _status(_one_response(held[0])) == 200
    finally:
        for sock in held:
            sock.close()
    # Once they close, everyone is served again.
    wait_for(lambda: _health_ok(server), timeout=30)
    with server.client() as c:
        assert all(c.get("/health").status_code == 200 for _ in range(5))
    refusals = [line for line in server.output().splitlines() if "refus" in line]
    assert refusals and "KIAPI_MAX_CONNECTIONS=20" in refusals[0]
    assert len(refusals) <= 2, refusals  # rate-limited, not one line per connection


def _health_ok(server: LiveServer) -> bool:
    return _health_ok_at(server.url)


def test_the_cap_is_fitted_to_the_open_files_limit(tmp_path: Path) -> None:
    """A cap the process cannot hold (2 fds a connection) is lowered with a warning, at start."""
    home = tmp_path / "home"
    log = tmp_path / "serve.log"
    port = free_port()

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    env = {**os.environ, "KIAPI_HOME": str(home), "KIAPI_PLUGINS": "echo"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            kiapi_command("serve", "--port", str(port)),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=low_fd_limit,
        )
    try:
        wait_for(lambda: b"capping connections at 96" in log.read_bytes(), timeout=60)
        wait_for(lambda: _health_ok_at(f"http://127.0.0.1:{port}"), timeout=60)
    finally:
        proc.terminate()
        proc.wait(15)
    assert b"KIAPI_MAX_CONNECTIONS=1000" in log.read_bytes()


def _health_ok_at(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
