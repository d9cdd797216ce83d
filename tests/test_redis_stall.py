"""A stalled Redis (the celery backend's store and broker) must not stall the API node's event
loop: a submit that waits on Redis waits on a thread, and every route that needs no Redis
answers at once meanwhile."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kiapi_core.testing import LiveServer, start_server
from kiapi_core.testing.redis import RedisServer, redis_server_binary, start_redis

pytestmark = pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server")


@pytest.fixture
def celery_api(tmp_path: Path) -> Iterator[tuple[LiveServer, RedisServer]]:
    server = start_redis(tmp_path / "redis")
    api = start_server(
        tmp_path / "api",
        {
            "KIAPI_BACKEND": "celery",
            "KIAPI_REDIS_URL": server.url,
            "KIAPI_REDIS_PREFIX": "stall",
            "KIAPI_FILES_DIR": str(tmp_path / "files"),
            "KIAPI_PLUGINS": "echo",
        },
    )
    try:
        yield api, server
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        api.stop()
        server.stop()


def test_a_stalled_redis_does_not_stall_the_event_loop(
    celery_api: tuple[LiveServer, RedisServer],
) -> None:
    api, redis_server = celery_api
    with httpx.Client(base_url=api.url, timeout=60) as c:
        assert (
            c.post("/v1/text/echo/run", json={"text": "warm", "mode": "async"}).status_code == 202
        )
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            # Submits that wait on the stalled Redis (store write, then the broker).
            stuck = [
                threading.Thread(
                    target=lambda: httpx.post(
                        f"{api.url}/v1/text/echo/run",
                        json={"text": "stuck", "mode": "async"},
                        timeout=60,
                    ),
                    daemon=True,
                )
                for _ in range(3)
            ]
            for t in stuck:
                t.start()
            time.sleep(1.0)  # they are in the server now, waiting on Redis
            worst = 0.0
            for _ in range(5):
                started = time.monotonic()
                # Served from memory: it needs nothing from Redis.
                assert c.get("/openapi.json").status_code == 200
                worst = max(worst, time.monotonic() - started)
            # Blocked loop: each waits for the stall (seconds); a free one answers in ms.
            assert worst < 1.0, f"/openapi.json took {worst:.2f} s while Redis was stalled"
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        for t in stuck:
            t.join(60)
        queued = c.get("/v1/jobs", params={"type": "echo"}).json()["jobs"]
        assert sum(j["params"]["text"] == "stuck" for j in queued) == 3
