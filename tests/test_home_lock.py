"""Two servers on one KIAPI_HOME: the second refuses to start (it would fail the first one's
running jobs as leftovers of a crash and delete its uploads in progress), and start-up cleanup
never removes a temp file a live process is writing."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kiapi_core.files.store import temp_prefix
from kiapi_core.testing import free_port, kiapi_command, wait_for

ECHO = "/v1/text/echo/run"
ENV = {"KIAPI_PLUGINS": "echo", "KIAPI_WORKERS": "1"}
BOUNDARY = "kiapilockboundary"


def start_upload(url: str, size: int) -> tuple[socket.socket, bytes]:
    """Send the headers and ``size`` bytes of a file's upload; the rest is returned, unsent."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="slow.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + b"s" * (2 * size) + f"\r\n--{BOUNDARY}--\r\n".encode()
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.sendall(
        (
            f"POST /v1/files HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
    )
    sent = len(head) + size
    sock.sendall(body[:sent])
    return sock, body[sent:]


def test_a_second_server_on_the_same_home_refuses_to_start(
    live_server: Callable[..., Any], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    first = live_server(ENV, home)
    with first.client() as c:
        r = c.post(ECHO, json={"text": "long", "steps": 60, "delay_s": 0.1, "mode": "async"})
        job_id = r.json()["job_id"]
        wait_for(lambda: c.get(f"/v1/jobs/{job_id}").json()["status"] == "running")
        sock, rest = start_upload(first.url, 3 * 1024 * 1024)
        try:
            temps = wait_for(lambda: list((home / "files" / "tmp").iterdir()))
            assert [t.name.startswith(temp_prefix(first.proc.pid)) for t in temps] == [True]

            second = subprocess.Popen(
                kiapi_command("serve", "--port", str(free_port())),
                env={**os.environ, **ENV, "KIAPI_HOME": str(home)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                out, _ = second.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                second.kill()
                out, _ = second.communicate()
                raise AssertionError(f"a second server started on the same home:\n{out}") from None
            assert second.returncode != 0, out
            assert str(home) in out and f"pid {first.proc.pid}" in out, out

            # Nothing of the first server's was touched.
            assert temps[0].exists()
            assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
            sock.sendall(rest)
            answer = sock.makefile("rb").read().decode(errors="replace")
        finally:
            sock.close()
        assert answer.startswith("HTTP/1.1 201"), answer[:300]
        done = wait_for(
            lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["status"] != "running" and j,
            timeout=60,
        )
        assert done["status"] == "succeeded", done
    first.stop()
    # Once the first is gone the home is free again.
    again = live_server(ENV, home)
    with again.client() as c:
        assert c.get("/health").status_code == 200


def test_start_up_cleanup_spares_the_temp_files_of_live_processes(
    live_server: Callable[..., Any], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    tmp = home / "files" / "tmp"
    tmp.mkdir(parents=True)
    alive = subprocess.Popen(["sleep", "120"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        live_temp = tmp / f"{temp_prefix(alive.pid)}abc123.part"
        dead_temp = tmp / f"{temp_prefix(dead.pid)}def456.part"
        old_style = tmp / "tmpxyz789.part"  # written by an older release: no owner
        for path in (live_temp, dead_temp, old_style):
            path.write_bytes(b"half a write")
        old = time.time() - 7 * 86400
        os.utime(live_temp, (old, old))  # however old: its writer is alive
        server = live_server(ENV, home)
        with server.client() as c:
            assert c.get("/health").status_code == 200
        assert sorted(p.name for p in tmp.iterdir()) == [live_temp.name]
    finally:
        alive.kill()
        alive.wait()
