"""Residency on the celery backend: a real redis-server, an API node and two ``kiapi worker``s
(kiapi-pair's fake models, one slot each). Jobs go to the worker that holds their model;
load, unload, keep_alive and readiness work across the cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from helpers import LiveServer, install_plugin, start_server, wait_for

from kiapi_core.jobs.store import JobRecord
from kiapi_core.state.redis import RedisJobStore, WorkerDirectory
from kiapi_core.testing.redis import LiveWorker, RedisServer, start_redis, start_worker

RUN = "/v1/text/pair/run"
PREFIX = "kiapi-residency-test"


@dataclass
class Cluster:
    root: Path
    redis: RedisServer
    env: dict[str, str]
    api: LiveServer
    workers: dict[str, LiveWorker]
    store: RedisJobStore
    readiness_without_workers: str

    def job(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        assert job is not None
        return job

    def node_of(self, job_id: str) -> str:
        worker = self.job(job_id).worker or ""
        return next(k for k, w in self.workers.items() if worker.startswith(w.name + "/"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    install_plugin("pair")
    root = tmp_path_factory.mktemp("residency-routing")
    server = start_redis(root / "redis")
    env = {
        "KIAPI_BACKEND": "celery",
        "KIAPI_REDIS_URL": server.url,
        "KIAPI_REDIS_PREFIX": PREFIX,
        "KIAPI_FILES_DIR": str(root / "shared-files"),
        "KIAPI_PLUGINS": "pair",
        "KIAPI_JOB_LEASE_S": "2",
        "KIAPI_WORKER_NICE": "0",
    }
    client = redis.Redis.from_url(server.url, decode_responses=True)
    api = None
    workers: dict[str, LiveWorker] = {}
    try:
        api = start_server(root / "api", env)
        with httpx.Client(base_url=api.url) as c:
            readiness = c.get("/health").json()["readiness"]
        for key in ("a", "b"):
            workers[key] = start_worker(root / f"worker-{key}", key, env)
        yield Cluster(root, server, env, api, workers, RedisJobStore(client, PREFIX), readiness)
    finally:
        for proc in [*workers.values(), api]:
            if proc is not None:
                proc.stop()
        client.close()
        server.stop()


@pytest.fixture
def c(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.api.url, timeout=60) as client:
        wait_for(lambda: len(client.get("/health").json()["worker"]["workers"]) == 2)
        yield client


def terminal(c: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    done: dict[str, Any] = wait_for(
        lambda: (
            (j := c.get(f"/v1/jobs/{job_id}").json())["status"]
            in ("succeeded", "failed", "canceled")
            and j
        ),
        timeout=timeout,
    )
    return done


def model(c: httpx.Client, name: str) -> dict[str, Any]:
    return next(r for r in c.get("/v1/models").json()["data"] if r["id"] == f"pair/{name}")


def loads_by_worker(c: httpx.Client, cluster: Cluster) -> dict[str, dict[str, int]]:
    workers = c.get("/health").json()["worker"]["workers"]
    names = {w.name: k for k, w in cluster.workers.items()}
    return {names[w["node"]]: w["loads"] for w in workers}


def test_readiness_is_degraded_without_a_worker_and_ready_with_them(
    cluster: Cluster, c: httpx.Client
) -> None:
    assert cluster.readiness_without_workers == "degraded"
    assert c.get("/health").json()["readiness"] == "ready"


def test_jobs_go_to_the_worker_that_holds_their_model(cluster: Cluster, c: httpx.Client) -> None:
    holder: dict[str, str] = {}
    for name in ("pair-a", "pair-b"):
        job = terminal(c, c.post(f"/v1/models/pair/{name}/load").json()["id"])
        assert job["status"] == "succeeded" and job["result"]["loaded"], job
        holder[name] = cluster.node_of(job["id"])
        wait_for(lambda n=name: model(c, n)["resident"])  # type: ignore[misc]
    # The second load went to the worker holding nothing yet.
    assert set(holder.values()) == {"a", "b"}
    before = loads_by_worker(c, cluster)
    names = ["pair-a", "pair-b", "pair-b", "pair-a"] * 5
    ids = [
        c.post(RUN, json={"model": n, "mode": "async", "delay_s": 0.02}).json()["job_id"]
        for n in names
    ]
    for job_id, name in zip(ids, names, strict=True):
        job = terminal(c, job_id)
        assert job["status"] == "succeeded", job
        assert job["result"]["loaded"] is False, (name, job)
        assert cluster.node_of(job_id) == holder[name], (name, cluster.job(job_id).worker)
    assert loads_by_worker(c, cluster) == before  # no model loaded anywhere again
    for key, counts in before.items():
        assert list(counts) == [f"pair/{n}" for n, h in holder.items() if h == key]


def test_unload_reaches_the_worker_409_while_in_use(cluster: Cluster, c: httpx.Client) -> None:
    if not model(c, "pair-a")["resident"]:
        terminal(c, c.post("/v1/models/pair/pair-a/load").json()["id"])
        wait_for(lambda: model(c, "pair-a")["resident"])
    job_id = c.post(
        RUN, json={"model": "pair-a", "mode": "async", "steps": 40, "delay_s": 0.05}
    ).json()["job_id"]
    wait_for(lambda: model(c, "pair-a")["in_use"] == 1, timeout=20)
    assert c.delete("/v1/models/pair/pair-a/resident").status_code == 409
    assert terminal(c, job_id)["status"] == "succeeded"
    wait_for(lambda: model(c, "pair-a")["in_use"] == 0)
    r = c.delete("/v1/models/pair/pair-a/resident")
    assert r.status_code == 200, r.text
    assert r.json()["resident"] is False
    rows = c.get("/health").json()["worker"]["workers"]
    assert not any(k.startswith("pair/pair-a") for w in rows for k in w["resident"])


def test_keep_alive_0_unloads_on_the_worker(cluster: Cluster, c: httpx.Client) -> None:
    r = c.post(RUN, json={"model": "pair-a"}, headers={"X-Kiapi-Keep-Alive": "0"})
    assert r.status_code == 200, r.text
    assert cluster.job(r.json()["id"]).keep_alive_s == 0
    wait_for(lambda: not model(c, "pair-a")["resident"], timeout=10)


def test_a_backlog_longer_than_a_load_goes_to_the_free_worker(
    cluster: Cluster, c: httpx.Client
) -> None:
    """Jobs pile up behind the only holder of pair-a while the other worker is free: while the
    wait there (jobs ahead x a use of ~0.02 s) is shorter than a load (0.3 s) they wait for
    the holder; past that, the free worker loads pair-a and takes them (routing.py)."""
    wait_for(lambda: c.delete("/v1/models/pair/pair-a/resident").json()["resident"] is False)
    load = terminal(c, c.post("/v1/models/pair/pair-a/load").json()["id"])
    holder = cluster.node_of(load["id"])
    other = next(k for k in cluster.workers if k != holder)
    short = {"model": "pair-a", "delay_s": 0.02}
    for _ in range(3):  # the use time the holder advertises
        # At once after the load's answer: the API node read the directory again when the
        # load ended (its 0.25 s old view sent this job to the shared queue, to a new load).
        r = c.post(RUN, json=short)
        assert r.status_code == 200 and r.json()["result"]["loaded"] is False, r.text
        assert cluster.node_of(r.json()["id"]) == holder
    directory = WorkerDirectory(cluster.store.r, PREFIX)

    def use_time() -> float | None:
        entry = next(w for w in directory.live() if w["node"] == cluster.workers[holder].name)
        rows = [r for r in entry["resident"] if r["key"].startswith("pair/pair-a")]
        return rows[0]["run_s"] if rows and rows[0]["run_s"] is not None else None

    assert 0.02 <= wait_for(use_time) < 0.1
    loads_before = loads_by_worker(c, cluster)
    long = c.post(RUN, json={**short, "mode": "async", "steps": 40, "delay_s": 0.05})
    ids = [c.post(RUN, json={**short, "mode": "async"}).json()["job_id"] for _ in range(40)]
    for job_id in [long.json()["job_id"], *ids]:
        assert terminal(c, job_id)["status"] == "succeeded"
    nodes = [cluster.node_of(job_id) for job_id in ids]
    assert nodes[:5] == [holder] * 5, nodes  # a wait of a few uses beats a load
    assert other in nodes, nodes
    loads = loads_by_worker(c, cluster)
    assert loads[other].get("pair/pair-a", 0) == loads_before[other].get("pair/pair-a", 0) + 1
    assert loads[holder] == loads_before[holder]


def test_a_job_waiting_for_a_gone_worker_goes_to_the_shared_queue(
    cluster: Cluster, c: httpx.Client
) -> None:
    if not model(c, "pair-b")["resident"]:
        terminal(c, c.post("/v1/models/pair/pair-b/load").json()["id"])
        wait_for(lambda: model(c, "pair-b")["resident"])
    holder = next(
        k
        for k, w in cluster.workers.items()
        if any(
            r.startswith("pair/pair-b")
            for row in c.get("/health").json()["worker"]["workers"]
            if row["node"] == w.name
            for r in row["resident"]
        )
    )
    # Both workers busy (so the next pair-b job waits for its holder), then the holder is
    # gone for good: the job routed to it must still run.
    long = {"mode": "async", "steps": 200, "delay_s": 0.05}
    busy = c.post(RUN, json={"model": "pair-b", **long}).json()["job_id"]
    wait_for(lambda: cluster.job(busy).status == "running", timeout=20)
    other = c.post(RUN, json={"model": "pair-a", **long}).json()["job_id"]
    wait_for(lambda: cluster.job(other).status == "running", timeout=20)
    assert cluster.node_of(other) != holder
    # As the API node sees it (the routing decision reads the same view).
    wait_for(lambda: all(w["running"] for w in c.get("/health").json()["worker"]["workers"]))
    waiting = c.post(RUN, json={"model": "pair-b", "mode": "async"}).json()["job_id"]
    assert cluster.store.routed().get(waiting) == cluster.workers[holder].name
    cluster.workers[holder].kill()
    try:
        job = terminal(c, waiting, timeout=90)
        assert job["status"] == "succeeded", job
        assert cluster.node_of(waiting) != holder
        c.post(f"/v1/jobs/{other}/cancel")
    finally:
        cluster.workers[holder] = start_worker(
            cluster.root / f"worker-{holder}", holder, cluster.env
        )
