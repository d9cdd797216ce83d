"""Resumable job events against real servers: Last-Event-ID after a disconnect, across a
restart, on a second API node (Celery + a real Redis); GET /v1/events; slow readers."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import LiveServer, start_server, wait_for

from kiapi_core.jobs.journal import event_key
from kiapi_core.runtime.rss import rss_bytes
from kiapi_core.testing.redis import start_redis, start_worker

ECHO = "/v1/text/echo/run"
Event = tuple[str, str, dict[str, Any]]  # (id, event, data)


def read_events(lines: Iterator[str]) -> Iterator[Event]:
    event_id, kind, data = "", "", ""
    for line in lines:
        if line == "":
            if kind:
                yield event_id, kind, json.loads(data)
            kind, data = "", ""
        elif line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = line[6:]


def follow(
    server: LiveServer,
    path: str,
    last_id: str | None = None,
    stop: Callable[[list[Event]], bool] = lambda events: False,
) -> list[Event]:
    """The events of one connection: until the server ends it or ``stop`` says so."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    events: list[Event] = []
    with (
        server.client(timeout=60) as c,
        c.stream("GET", path, headers=headers) as r,
    ):
        assert r.status_code == 200, r.read()
        for event in read_events(r.iter_lines()):
            events.append(event)
            if stop(events):
                break
    return events


def submit(server: LiveServer, **params: Any) -> str:
    with server.client() as c:
        r = c.post(ECHO, json={"text": "hi", "mode": "async", **params})
        assert r.status_code == 202, r.text
        job_id: str = r.json()["job_id"]
        return job_id


def durable_ids_increase(events: list[Event]) -> None:
    keys = [event_key(i) for i, _, _ in events]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), [i for i, _, _ in events]


def progress_at_least(n: int) -> Callable[[list[Event]], bool]:
    return lambda events: sum(1 for _, _, d in events if d.get("progress")) >= n


def check_resumed(first: list[Event], resumed: list[Event], full: list[Event]) -> None:
    """What two connections got is what one that never dropped gets: nothing lost, no repeat."""
    got = first[1:] + resumed
    assert [(i, k, d) for i, k, d in got] == [(i, k, d) for i, k, d in full]
    durable_ids_increase(first + resumed)
    assert got[-1][1] == "end"


def test_resume_after_a_disconnect_mid_job(live_server: Callable[..., LiveServer]) -> None:
    server = live_server({"KIAPI_PLUGINS": "echo"})
    job_id = submit(server, steps=40, delay_s=0.05)
    path = f"/v1/jobs/{job_id}/events"
    first = follow(server, path, stop=progress_at_least(5))
    time.sleep(0.5)  # the job goes on meanwhile: those are the events to catch up
    resumed = follow(server, path, first[-1][0])
    assert resumed[0][2]["progress"] > first[-1][2]["progress"]
    full = follow(server, path, first[0][0])
    check_resumed(first, resumed, full)
    assert [k for _, k, _ in full] == ["progress"] * (len(full) - 1) + ["end"]
    assert full[-1][2]["status"] == "succeeded"
    # After the end: nothing more comes, and 204 stops an EventSource from reconnecting.
    with server.client() as c:
        r = c.get(path, headers={"Last-Event-ID": full[-1][0]})
        assert r.status_code == 204 and r.content == b""
        bad = c.get(path, headers={"Last-Event-ID": "yesterday"})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["header", "Last-Event-ID"]
        assert c.get(f"{path}?last_event_id=1-x").status_code == 422


def test_resume_across_a_server_restart(
    live_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    server = live_server({"KIAPI_PLUGINS": "echo"}, home=home)
    job_id = submit(server, steps=400, delay_s=0.05)
    path = f"/v1/jobs/{job_id}/events"
    first = follow(server, path, stop=progress_at_least(4))
    time.sleep(0.3)
    server.stop()  # the running job ends failed (interrupted): its last events
    again = live_server({"KIAPI_PLUGINS": "echo"}, home=home)
    resumed = follow(again, path, first[-1][0])
    full = follow(again, path, first[0][0])
    check_resumed(first, resumed, full)
    assert resumed[-1][2]["status"] == "failed" and "interrupted" in resumed[-1][2]["error"]


def test_every_jobs_stream_filters_by_type_and_status(
    live_server: Callable[..., LiveServer],
) -> None:
    server = live_server({"KIAPI_PLUGINS": "echo", "KIAPI_SSE_KEEPALIVE_S": "0.5"})
    with server.client() as c:
        assert c.get("/v1/events?status=done").status_code == 422
    marker = submit(server, steps=1, delay_s=0)
    start = follow(server, f"/v1/jobs/{marker}/events")[-1][0]  # its end: the journal so far
    ids = [submit(server, steps=3, delay_s=0.01) for _ in range(3)]

    def succeeded(events: list[Event]) -> bool:
        return {d["id"] for _, k, d in events if d["status"] == "succeeded"} >= set(ids)

    # From before the first submit: the journal has every change since.
    everything = follow(server, f"/v1/events?type=echo&last_event_id={start}", stop=succeeded)
    assert {k for _, k, _ in everything} == {"job"}
    statuses = [d["status"] for _, _, d in everything if d["id"] == ids[0]]
    assert statuses[0] == "queued" and "running" in statuses and statuses[-1] == "succeeded"
    durable_ids_increase(everything)
    done = follow(server, f"/v1/events?status=succeeded&last_event_id={start}", stop=succeeded)
    assert all(d["status"] == "succeeded" for _, _, d in done)
    assert [d["id"] for _, _, d in done] == ids
    # Resuming the all-jobs stream mid-way gives the rest of it.
    half = len(everything) // 2
    rest = follow(
        server,
        f"/v1/events?type=echo&last_event_id={everything[half][0]}",
        stop=lambda events: len(events) == len(everything) - half - 1,
    )
    assert rest == everything[half + 1 :]

    # Another type: nothing, only keep-alives (read raw, to see them).
    with (
        server.client(timeout=10) as c,
        c.stream("GET", f"/v1/events?type=other&last_event_id={start}") as s,
    ):
        seen = ""
        for line in s.iter_lines():
            seen += line + "\n"
            if line.startswith(": keep-alive"):
                break
    assert "event:" not in seen

    # Live, from now: a new job's changes arrive as they happen.
    live: list[Event] = []

    def new_job_done(events: list[Event]) -> bool:
        if not live:
            live.append(("", "", {"id": submit(server, steps=2, delay_s=0.01)}))
        return any(d["status"] == "succeeded" for _, _, d in events)

    with server.client(timeout=30) as c, c.stream("GET", "/v1/events") as s:
        events: list[Event] = []
        lines = s.iter_lines()
        new_job_done(events)
        for event in read_events(lines):
            events.append(event)
            if new_job_done(events):
                break
    assert {d["id"] for _, _, d in events} == {live[0][2]["id"]}
    assert events[0][2]["status"] == "queued"


def test_an_id_past_retention_resets_the_stream(live_server: Callable[..., LiveServer]) -> None:
    server = live_server({"KIAPI_PLUGINS": "echo", "KIAPI_EVENTS_RETAIN": "1000"})
    job_id = submit(server, steps=600, delay_s=0)
    other = submit(server, steps=600, delay_s=0)
    with server.client() as c:
        wait_for(lambda: c.get(f"/v1/jobs/{other}").json()["status"] == "succeeded", timeout=60)
    # The journal kept the last ~1000 of ~1200 entries: id 1 (job_id's creation) is gone.
    events = follow(server, f"/v1/jobs/{job_id}/events", "1")
    assert [k for _, k, _ in events] == ["reset", "end"]
    assert events[0][2]["last_event_id"] == "1" and "KIAPI_EVENTS_RETAIN" in events[0][2]["detail"]
    assert events[1][2]["status"] == "succeeded"


def _raw_follow(port: int, path: str) -> socket.socket:
    """A reader that never reads: a tiny receive buffer, the request sent, nothing read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    return sock


def test_a_reader_that_never_reads_still_gets_the_end(
    live_server: Callable[..., LiveServer],
) -> None:
    server = live_server({"KIAPI_PLUGINS": "echo"})
    port = int(server.url.rsplit(":", 1)[1])
    text = "x" * 10_000  # every event carries it: ~10 kB each
    jobs = [submit(server, text=text, steps=1000, delay_s=0.002) for _ in range(3)]
    socks = [_raw_follow(port, f"/v1/jobs/{j}/events") for j in jobs]
    time.sleep(0.5)
    before = rss_bytes(server.proc.pid)
    with server.client() as c:
        for job_id in jobs:
            wait_for(lambda j=job_id: c.get(f"/v1/jobs/{j}").json()["status"] == "succeeded", 120)
    after = rss_bytes(server.proc.pid)
    # ~30 MB of events went past these readers: the server kept a bounded backlog for them.
    assert after - before < 20 * 2**20, (before, after)
    for sock in socks:
        got = b""
        sock.settimeout(10)
        while b"event: end" not in got:
            chunk = sock.recv(1 << 20)
            assert chunk, got[-500:]
            got += chunk
        sock.close()
        # Intermediate progress was dropped for it, never the end.
        assert got.count(b"event: progress") < 1000


# -- Celery + Redis: a second API node ---------------------------------------------------------
@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    redis_server = start_redis(tmp_path / "redis")
    env = {
        "KIAPI_BACKEND": "celery",
        "KIAPI_REDIS_URL": redis_server.url,
        "KIAPI_REDIS_PREFIX": "kiapi-events-test",
        "KIAPI_FILES_DIR": str(tmp_path / "shared-files"),
        "KIAPI_PLUGINS": "echo",
        "KIAPI_WORKER_NICE": "0",
        "TQDM_DISABLE": "1",
    }
    started: list[Any] = []
    try:
        started.append(start_worker(tmp_path / "worker", "w1", env))
        a = start_server(tmp_path / "api-a", env)
        started.append(a)
        b = start_server(tmp_path / "api-b", env)
        started.append(b)
        yield a, b
    finally:
        for proc in started:
            proc.stop()
        redis_server.stop()


def test_resume_on_a_second_api_node(two_nodes: tuple[LiveServer, LiveServer]) -> None:
    a, b = two_nodes
    job_id = submit(a, steps=40, delay_s=0.05)
    path = f"/v1/jobs/{job_id}/events"
    first = follow(a, path, stop=progress_at_least(5))
    time.sleep(0.5)
    resumed = follow(b, path, first[-1][0])  # the client came back through the other node
    full = follow(b, path, first[0][0])
    check_resumed(first, resumed, full)
    assert full[-1][2]["status"] == "succeeded"
    # Both nodes tell the same story, ids and all; and /v1/events resumes there too.
    assert follow(a, path, first[0][0]) == full
    every = follow(
        b,
        f"/v1/events?last_event_id={first[0][0]}",
        stop=lambda e: e[-1][1] == "job" and e[-1][2]["status"] == "succeeded",
    )
    assert [(i, d) for i, _, d in every] == [(i, d) for i, _, d in full]
