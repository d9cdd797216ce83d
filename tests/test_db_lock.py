"""Another process holding kiapi.db's write lock never stalls the event loop (issue 13, item 6)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers import LiveServer

ECHO = {"text": "hi", "steps": 1, "delay_s": 0, "mode": "async"}


@contextmanager
def write_lock(db: Path, hold_s: float) -> Iterator[threading.Event]:
    """Hold the database's write lock from this (test) process for ``hold_s`` seconds."""
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(db, isolation_level=None, timeout=30)
        conn.execute("BEGIN IMMEDIATE")
        taken.set()
        done.wait(hold_s)
        conn.execute("ROLLBACK")
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert taken.wait(10)
    try:
        yield done
    finally:
        done.set()
        thread.join()


def _health_worst(server: LiveServer, until: threading.Event) -> Callable[[], float]:
    """Poll /health from a thread until ``until``; returns a getter of the slowest answer."""
    worst = [0.0]

    def poll() -> None:
        with server.client(timeout=30) as c:
            while not until.is_set():
                t0 = time.perf_counter()
                assert c.get("/health").status_code == 200
                worst[0] = max(worst[0], time.perf_counter() - t0)
                time.sleep(0.02)

    thread = threading.Thread(target=poll)
    thread.start()
    return lambda: (until.set(), thread.join(), worst[0])[2]


def test_locked_database_bounds_submits_and_keeps_health(
    live_server: Callable[..., LiveServer],
) -> None:
    server = live_server({"KIAPI_PLUGINS": "echo", "KIAPI_STORE_BUSY_TIMEOUT_S": "1.5"})
    with server.client() as c:
        assert c.post("/v1/text/echo/run", json=ECHO).status_code == 202  # the db exists, warm
        stop = threading.Event()
        with write_lock(server.home / "kiapi.db", hold_s=5.0):
            worst = _health_worst(server, stop)
            t0 = time.perf_counter()
            r = c.post("/v1/text/echo/run", json=ECHO)
            took = time.perf_counter() - t0
            reads = [c.get("/v1/jobs").status_code for _ in range(3)]
            slowest_health = worst()
        # The submit waited its bound off the loop, then told the client to come back.
        assert r.status_code == 503, r.text
        assert "busy" in r.json()["detail"] and "KIAPI_STORE_BUSY_TIMEOUT_S" in r.json()["detail"]
        assert int(r.headers["Retry-After"]) >= 1
        assert 1.0 < took < 4.5, took
        # Reads never wait for a writer in WAL mode; /health stayed responsive throughout.
        assert reads == [200, 200, 200]
        assert slowest_health < 1.0, slowest_health
        # Once the lock is gone, submits work again.
        assert c.post("/v1/text/echo/run", json=ECHO).status_code == 202


def test_short_lock_delays_a_submit_without_blocking_others(
    live_server: Callable[..., LiveServer],
) -> None:
    server = live_server({"KIAPI_PLUGINS": "echo"})
    with server.client() as c:
        assert c.post("/v1/text/echo/run", json=ECHO).status_code == 202
        stop = threading.Event()
        with write_lock(server.home / "kiapi.db", hold_s=1.0):
            worst = _health_worst(server, stop)
            t0 = time.perf_counter()
            r = c.post("/v1/text/echo/run", json=ECHO)
            took = time.perf_counter() - t0
            slowest_health = worst()
        assert r.status_code == 202, r.text
        assert took > 0.5
        assert slowest_health < 0.5, slowest_health
        job = r.json()["job_id"]
        assert c.delete(f"/v1/jobs/{job}").status_code in (200, 202, 409)
