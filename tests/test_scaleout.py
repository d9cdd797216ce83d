"""Scale-out end to end: a real redis-server, API nodes and ``kiapi worker``s as processes.

One Redis, one shared files directory, API nodes with KIAPI_BACKEND=celery and their own
(empty) homes, and two workers on separate homes: worker ``a`` has the ideogram4 weights (the
tiny random checkpoint) activated, worker ``b`` has none, so it serves echo only (with two
model slots). Leases are
short here (2 s) so that a lost worker is noticed quickly.
"""

from __future__ import annotations

import io
import json
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from helpers import LiveServer, run_cli, start_server, wait_for

from kiapi_core.files.store import FileStore
from kiapi_core.jobs.context import artifact_file_id
from kiapi_core.jobs.store import JobRecord
from kiapi_core.state.redis import RedisFileMeta, RedisJobStore
from kiapi_core.testing.redis import LiveWorker, RedisServer, start_redis, start_worker

ECHO = "/v1/text/echo/run"
GENERATE = "/v1/image/ideogram4/generate"
TERMINAL = {"succeeded", "failed", "canceled"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
PREFIX = "kiapi-scaleout-test"


@dataclass
class Cluster:
    root: Path
    redis: RedisServer
    env: dict[str, str]
    api: LiveServer
    workers: dict[str, LiveWorker]
    store: RedisJobStore
    files: FileStore

    def start_api(self, home: str) -> LiveServer:
        return start_server(self.root / home, self.env)

    def start_worker(self, key: str) -> LiveWorker:
        # b has two model slots: two jobs at once, each on its own thread.
        args = ("--concurrency", "2") if key == "b" else ()
        return start_worker(self.root / f"worker-{key}", key, self.env, *args)

    def job(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        assert job is not None
        return job

    def node_of(self, job_id: str) -> str:
        """The worker key ("a" or "b") whose node ran ``job_id`` (its last run)."""
        worker = self.job(job_id).worker or ""
        return next(k for k, w in self.workers.items() if worker.startswith(w.name + "/"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from kiapi_ideogram4.testing import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("scaleout")
    server = start_redis(root / "redis")
    env = {
        **OFFLINE,
        "KIAPI_BACKEND": "celery",
        "KIAPI_REDIS_URL": server.url,
        "KIAPI_REDIS_PREFIX": PREFIX,
        "KIAPI_FILES_DIR": str(root / "shared-files"),
        "KIAPI_PLUGINS": "echo,ideogram4",
        "KIAPI_JOB_LEASE_S": "2",
        "KIAPI_CELERY_VISIBILITY_TIMEOUT_S": "5",
        "KIAPI_WORKER_NICE": "0",
    }
    checkpoint = build_tiny_checkpoint(root / "weights" / "ideogram-4-tiny")
    activated = run_cli(
        "activate",
        "ideogram4",
        "--path",
        str(checkpoint),
        env={**OFFLINE, "KIAPI_HOME": str(root / "worker-a"), "KIAPI_PLUGINS": "ideogram4"},
    )
    assert activated.returncode == 0, activated.stderr
    client = redis.Redis.from_url(server.url, decode_responses=True)
    cluster = Cluster(
        root=root,
        redis=server,
        env=env,
        api=None,
        workers={},  # type: ignore[arg-type]
        store=RedisJobStore(client, PREFIX),
        files=FileStore(root / "shared-files", RedisFileMeta(client, PREFIX)),
    )
    try:
        cluster.api = cluster.start_api("api")
        for key in ("a", "b"):
            cluster.workers[key] = cluster.start_worker(key)
        yield cluster
    finally:
        for proc in [*cluster.workers.values(), cluster.api]:
            if proc is not None:
                proc.stop()
        client.close()
        server.stop()


def terminal(c: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job: dict[str, Any] = c.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in TERMINAL else None

    job: dict[str, Any] = wait_for(check, timeout=timeout, interval=0.1)
    return job


def async_echo(c: httpx.Client, text: str, steps: int, delay_s: float) -> str:
    r = c.post(ECHO, json={"text": text, "steps": steps, "delay_s": delay_s, "mode": "async"})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    return job_id


def sse(c: httpx.Client, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    kind = ""
    with c.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
    return events


def test_health_lists_the_live_workers(cluster: Cluster) -> None:
    with cluster.api.client() as c:
        info = c.get("/health").json()["worker"]
    assert info["mode"] == "celery"
    nodes = {w["node"]: w for w in info["workers"]}
    assert set(nodes) == {w.name for w in cluster.workers.values()}
    b = nodes[cluster.workers["b"].name]
    assert b["concurrency"] == 2 and "echo" in b["types"] and isinstance(b["pid"], int)
    # Only worker a has ideogram4's weights, so only it takes ideogram4 jobs.
    assert "ideogram4" in nodes[cluster.workers["a"].name]["types"]
    assert "ideogram4" not in b["types"]


def test_twenty_echo_jobs_spread_over_both_workers(cluster: Cluster) -> None:
    with cluster.api.client() as c:
        ids = [async_echo(c, f"job {i}", steps=3, delay_s=0.05) for i in range(20)]
        done = [terminal(c, job_id) for job_id in ids]
        assert [j["status"] for j in done] == ["succeeded"] * 20, done
        assert {cluster.node_of(job_id) for job_id in ids} == {"a", "b"}
        slots = {(cluster.job(job_id).worker or "").split("#")[0] for job_id in ids}
        b = cluster.workers["b"].name
        assert {f"{b}/0", f"{b}/1"} <= slots, slots
        # Every artifact is served by the API node from the shared directory, whichever
        # worker wrote it; one file per job, with the id derived from the job.
        for i, job in enumerate(done):
            assert job["artifacts"] == [artifact_file_id(job["id"], 1, 0)]
            got = c.get(f"/v1/files/{job['artifacts'][0]}/download")
            assert got.status_code == 200 and got.content == f"job {i}".encode()
        listed = c.get("/v1/jobs", params={"type": "echo", "limit": 20}).json()["jobs"]
        assert [j["id"] for j in listed] == ids[::-1]
        # A sync request waits for the remote worker and answers with the artifact itself.
        raw = c.post(ECHO, json={"text": "sync", "steps": 2, "delay_s": 0})
        assert raw.status_code == 200 and raw.content == b"sync"
        assert raw.headers["x-kiapi-job-id"].startswith("job_")


def test_any_api_node_answers_for_any_job(cluster: Cluster) -> None:
    """Submit on one node; read, list, follow (SSE) and cancel on another."""
    other = cluster.start_api("api-2")
    try:
        with cluster.api.client() as c1, other.client() as c2:
            followed = async_echo(c1, "followed", steps=8, delay_s=0.1)
            events = sse(c2, followed)
            assert events[-1][0] == "end" and events[-1][1]["status"] == "succeeded"
            progress = [e["progress"] for kind, e in events if kind == "progress"]
            assert len({p for p in progress if p is not None}) >= 4, events
            assert progress == sorted(p or 0 for p in progress)
            assert c2.get(f"/v1/jobs/{followed}").json() == c1.get(f"/v1/jobs/{followed}").json()
            assert followed in [j["id"] for j in c2.get("/v1/jobs").json()["jobs"]]

            doomed = async_echo(c1, "stop me", steps=400, delay_s=0.05)
            wait_for(lambda: (c2.get(f"/v1/jobs/{doomed}").json()["progress"] or 0) > 0)
            r = c2.delete(f"/v1/jobs/{doomed}")
            assert r.status_code == 202 and r.json()["status"] == "running"
            ended = terminal(c1, doomed, timeout=20)
            assert ended["status"] == "canceled" and ended["artifacts"] == []
            assert ended["progress"] < 0.5  # it stopped at a step, not at its end
            assert c2.get("/v1/files", params={"job_id": doomed}).json()["files"] == []
            assert c2.delete(f"/v1/jobs/{doomed}").status_code == 409
    finally:
        other.stop()


def test_ideogram4_runs_on_the_worker_whose_model_is_active(cluster: Cluster) -> None:
    from PIL import Image

    with cluster.api.client(timeout=300) as c:
        # The API node has no weights of its own; a live worker does.
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["ideogram4/fp8"]["active"] is True
        r = c.post(
            GENERATE,
            json={
                "prompt": "a red poster that says HI",
                "width": 256,
                "height": 256,
                "preset": "V4_TURBO_12",
                "seed": 7,
            },
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (256, 256)
        job_id = r.headers["x-kiapi-job-id"]
        assert cluster.node_of(job_id) == "a"  # b has no active ideogram4 model
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["result"]["params"]["seed"] == 7 and job["progress"] == 1.0
        assert c.get(f"/v1/files/{job['artifacts'][0]}/download").content == r.content


def test_sigquit_hands_running_jobs_back_at_once(cluster: Cluster) -> None:
    """SIGTERM lets running jobs finish; SIGQUIT (or a second Ctrl-C) stops the worker now,
    its job back in the queue for the other one, rather than waiting for it or for a lease."""
    with cluster.api.client() as c:
        job_id = async_echo(c, "handed back", steps=150, delay_s=0.03)
        wait_for(lambda: (c.get(f"/v1/jobs/{job_id}").json()["progress"] or 0) > 0.02)
        leaving = cluster.node_of(job_id)
        other = "b" if leaving == "a" else "a"
        worker = cluster.workers[leaving]
        worker.proc.send_signal(signal.SIGQUIT)
        assert worker.proc.wait(20) == 0
        # It stopped the job rather than waiting for it to finish.
        assert f"job {job_id} handed back to its queue" in worker.output()
        done = terminal(c, job_id, timeout=60)
        assert done["status"] == "succeeded" and cluster.node_of(job_id) == other
        assert [
            f["id"] for f in c.get("/v1/files", params={"job_id": job_id}).json()["files"]
        ] == done["artifacts"]
    cluster.workers[leaving] = cluster.start_worker(leaving)


def test_a_worker_killed_mid_job_its_job_finishes_on_the_other(cluster: Cluster) -> None:
    with cluster.api.client() as c:
        job_id = async_echo(c, "survivor", steps=60, delay_s=0.05)
        wait_for(lambda: (c.get(f"/v1/jobs/{job_id}").json()["progress"] or 0) > 0.1)
        victim = cluster.node_of(job_id)
        survivor = "b" if victim == "a" else "a"
        # What the lost run had saved already (echo saves only at its end, so put it there
        # by hand): the run that takes over must remove it.
        partial = cluster.files.put_bytes(
            b"half an output",
            filename="partial.txt",
            content_type="text/plain",
            job_id=job_id,
            file_id=artifact_file_id(job_id, 1, 0),
        )
        cluster.workers[victim].kill()

        done = terminal(c, job_id, timeout=60)
        assert done["status"] == "succeeded", done
        assert cluster.node_of(job_id) == survivor and cluster.job(job_id).attempt == 2
        assert done["artifacts"] == [artifact_file_id(job_id, 2, 0)]
        by_job = c.get("/v1/files", params={"job_id": job_id}).json()["files"]
        assert [f["id"] for f in by_job] == done["artifacts"]
        assert c.get(f"/v1/files/{partial.id}").status_code == 404
        assert c.get(f"/v1/files/{done['artifacts'][0]}/download").content == b"survivor"
        # Celery redelivers the killed worker's message too, to the queue it came from: the
        # shared one, or the victim's own (residency routing), read once it is back. That
        # duplicate is dropped.
        cluster.workers[victim] = cluster.start_worker(victim)
        dropped = f"job {job_id}: (busy|done); message dropped"
        wait_for(
            lambda: any(re.search(dropped, w.output()) for w in cluster.workers.values()),
            timeout=30,
        )
        assert cluster.job(job_id).attempt == 2


def test_restarting_the_api_node_loses_nothing(cluster: Cluster) -> None:
    with cluster.api.client() as c:
        finished = c.post(
            ECHO,
            json={"text": "before", "steps": 1, "delay_s": 0},
            headers={"Accept": "application/json"},
        ).json()
        assert finished["status"] == "succeeded"
        uploaded = c.post("/v1/files", files={"file": ("kept.bin", b"\x00kept\xff")}).json()
        running = async_echo(c, "running", steps=30, delay_s=0.05)
        wait_for(lambda: c.get(f"/v1/jobs/{running}").json()["status"] == "running")
        queued = [async_echo(c, f"queued {i}", steps=10, delay_s=0.05) for i in range(4)]

    cluster.api.kill()
    # A fresh home: the new node starts with nothing of its own, everything comes from Redis.
    cluster.api = cluster.start_api("api-restarted")
    with cluster.api.client() as c:
        assert c.get(f"/v1/jobs/{finished['id']}").json() == finished
        got = c.get(f"/v1/files/{uploaded['id']}/download")
        assert got.status_code == 200 and got.content == b"\x00kept\xff"
        for job_id, text in [
            (running, "running"),
            *((q, f"queued {i}") for i, q in enumerate(queued)),
        ]:
            job = terminal(c, job_id)
            assert job["status"] == "succeeded", job
            content = c.get(f"/v1/files/{job['artifacts'][0]}/download").content
            assert content == text.encode()
        listed = {j["id"] for j in c.get("/v1/jobs", params={"limit": 10}).json()["jobs"]}
        assert {finished["id"], running, *queued} <= listed
        wait_for(lambda: c.get("/health").json()["queue"] == {"waiting": 0, "running": 0})


def test_a_redis_restart_loses_nothing(cluster: Cluster) -> None:
    """Redis down for a moment (AOF on): nodes answer 503 meanwhile, then everything resumes."""
    with cluster.api.client() as c:
        before = async_echo(c, "before", steps=1, delay_s=0)
        assert terminal(c, before)["status"] == "succeeded"
        across = async_echo(c, "across", steps=30, delay_s=0.1)
        wait_for(lambda: c.get(f"/v1/jobs/{across}").json()["status"] == "running")
        cluster.redis.stop()
        down = c.get(f"/v1/jobs/{across}")
        assert down.status_code == 503 and down.headers["retry-after"] == "5"
        cluster.redis.restart(down_s=1.0)
        # The job's run broke off with the store; its lease lapses and it runs again.
        assert terminal(c, across)["status"] == "succeeded"
        assert terminal(c, before)["status"] == "succeeded"
        after = c.post(ECHO, json={"text": "after", "steps": 1, "delay_s": 0})
        assert after.status_code == 200 and after.content == b"after"
