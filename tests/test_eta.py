"""ETA (issue 17, item 7) end to end on real servers, on both backends: ``eta_s`` of running
jobs (the handler's own, or the host's estimate) and ``estimated_start_at`` of queued ones.

``embedded``: one ``kiapi serve`` whose jobs run in its worker process, so every estimate
crosses the process pipe. ``celery``: a real redis-server, an API node and one ``kiapi worker``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import LiveServer, start_server, wait_for

from kiapi_core.testing.redis import redis_server_binary, start_redis, start_worker

ECHO = "/v1/text/echo/run"
ENV = {"KIAPI_PLUGINS": "echo", "KIAPI_WORKER_NICE": "0"}


@dataclass
class Node:
    backend: str
    api: LiveServer
    stops: list[Any] = field(default_factory=list)


@pytest.fixture(scope="module", params=["embedded", "celery"])
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    root: Path = tmp_path_factory.mktemp(f"eta-{request.param}")
    stops: list[Any] = []
    try:
        if request.param == "embedded":
            stops.append(start_server(root / "home", ENV))
            yield Node("embedded", stops[-1])
            return
        if redis_server_binary() is None:
            pytest.skip("redis-server is not installed")
        server = start_redis(root / "redis")
        stops.append(server)
        env = {
            **ENV,
            "KIAPI_BACKEND": "celery",
            "KIAPI_REDIS_URL": server.url,
            "KIAPI_REDIS_PREFIX": "kiapi-eta",
            "KIAPI_FILES_DIR": str(root / "shared-files"),
        }
        api = start_server(root / "api", env)
        stops.append(api)
        stops.append(start_worker(root / "w1", "w1", env))
        yield Node("celery", api)
    finally:
        for proc in reversed(stops):
            proc.stop()


def submit(c: httpx.Client, **body: Any) -> str:
    r = c.post(ECHO, json={"text": "eta", **body, "mode": "async"})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    return job_id


def job(c: httpx.Client, job_id: str) -> dict[str, Any]:
    data: dict[str, Any] = c.get(f"/v1/jobs/{job_id}").json()
    return data


def terminal(c: httpx.Client, job_id: str) -> dict[str, Any]:
    done: dict[str, Any] = wait_for(
        lambda: (j := job(c, job_id))["status"] in ("succeeded", "failed", "canceled") and j,
        timeout=60,
    )
    return done


def test_a_declared_eta_counts_down_and_is_null_once_done(node: Node) -> None:
    with node.api.client(timeout=60) as c:
        job_id = submit(c, steps=40, delay_s=0.1, declare_eta=True)  # 4 s, declared
        first = wait_for(
            lambda: (j := job(c, job_id))["status"] == "running" and (j["progress"] or 0) > 0 and j,
            timeout=30,
        )
        assert first["eta_s"] is not None and 0 < first["eta_s"] <= 4.0
        assert first["started_at"] is not None and first["estimated_start_at"] is None
        # Between two reads it counts down by about the time passed (a generous bound).
        time.sleep(1.0)
        later = job(c, job_id)
        assert later["status"] == "running", later
        assert later["eta_s"] < first["eta_s"]
        assert first["eta_s"] - later["eta_s"] < 3.0
        # Lists and the event stream show it too.
        listed = c.get("/v1/jobs", params={"status": "running"}).json()["jobs"]
        assert any(j["id"] == job_id and j["eta_s"] is not None for j in listed)
        with c.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    data = json.loads(line.removeprefix("data:"))
                    if data["status"] == "running":
                        assert data["eta_s"] is not None
                        break
        done = terminal(c, job_id)
        assert done["status"] == "succeeded" and done["eta_s"] is None


def test_the_host_estimates_a_job_that_declares_nothing(node: Node) -> None:
    with node.api.client(timeout=60) as c:
        job_id = submit(c, steps=40, delay_s=0.1)  # 4 s, its handler gives no ETA
        first = wait_for(
            lambda: (
                (j := job(c, job_id))["status"] == "running"
                and (j["progress"] or 0) >= 0.2
                and j["eta_s"] is not None
                and j
            ),
            timeout=30,
        )
        # The progress rate says ~4 s in all: what is left is within a generous bound.
        assert 0 < first["eta_s"] < 10
        time.sleep(1.0)
        later = job(c, job_id)
        assert later["status"] == "running" and later["eta_s"] < first["eta_s"]
        assert terminal(c, job_id)["eta_s"] is None


def test_queued_jobs_behind_a_running_one_get_an_estimated_start(node: Node) -> None:
    with node.api.client(timeout=60) as c:
        terminal(c, submit(c, steps=2, delay_s=0.5))  # a recent run time of ~1 s
        blocker = submit(c, steps=40, delay_s=0.1, declare_eta=True)
        wait_for(lambda: (job(c, blocker)["progress"] or 0) > 0, timeout=30)
        queued = [submit(c, steps=2, delay_s=0.5) for _ in range(2)]
        now = time.time()
        first, second = (job(c, i) for i in queued)
        assert first["status"] == second["status"] == "queued", (first, second)
        assert first["eta_s"] is None
        # The blocker ends in <= 4 s; the second waits one run (~1 s) more.
        assert now - 1 < first["estimated_start_at"] < now + 8, first
        assert second["estimated_start_at"] > first["estimated_start_at"]
        assert second["estimated_start_at"] - first["estimated_start_at"] < 5
        for job_id in [blocker, *queued]:
            done = terminal(c, job_id)
            assert done["estimated_start_at"] is None and done["eta_s"] is None
