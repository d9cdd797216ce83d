"""Jobs that integrate (issue 17, items 2-5), end to end on real servers, on both backends:
idempotent submits, bounded waits (Prefer), deadlines (Cancel-After), retry and priority.

``embedded``: one ``kiapi serve`` (SQLite, its worker process, one model slot). ``celery``: a
real redis-server, an API node and two ``kiapi worker``s with one slot each.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import LiveServer, start_server, wait_for

from kiapi_core.jobs.submit import parse_cancel_after, parse_prefer
from kiapi_core.testing.redis import LiveWorker, redis_server_binary, start_redis, start_worker

ECHO = "/v1/text/echo/run"
TERMINAL = {"succeeded", "failed", "canceled"}
SYNC_TIMEOUT_S = 4
IDEMPOTENCY_TTL_S = 3
ENV = {
    "KIAPI_PLUGINS": "echo",
    "KIAPI_SYNC_TIMEOUT_S": str(SYNC_TIMEOUT_S),
    "KIAPI_IDEMPOTENCY_TTL_S": str(IDEMPOTENCY_TTL_S),
    "KIAPI_DEADLINE_SWEEP_S": "0.2",
    "KIAPI_WORKER_NICE": "0",
}


@dataclass
class Node:
    backend: str
    api: LiveServer
    slots: int  # jobs that run at once
    stops: list[Any] = field(default_factory=list)

    def client(self) -> httpx.Client:
        client: httpx.Client = self.api.client(timeout=60)
        return client


@pytest.fixture(scope="module", params=["embedded", "celery"])
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    root: Path = tmp_path_factory.mktemp(f"integrate-{request.param}")
    stops: list[Any] = []
    try:
        if request.param == "embedded":
            # Stopped like the others: it outlived the test session (and its worker) before.
            stops.append(start_server(root / "home", ENV))
            yield Node("embedded", stops[-1], slots=1)
            return
        if redis_server_binary() is None:
            pytest.skip("redis-server is not installed")
        server = start_redis(root / "redis")
        stops.append(server)
        env = {
            **ENV,
            "KIAPI_BACKEND": "celery",
            "KIAPI_REDIS_URL": server.url,
            "KIAPI_REDIS_PREFIX": "kiapi-integrate",
            "KIAPI_FILES_DIR": str(root / "shared-files"),
            "KIAPI_JOB_LEASE_S": "3",
        }
        api = start_server(root / "api", env)
        stops.append(api)
        workers: list[LiveWorker] = []
        for name in ("w1", "w2"):
            workers.append(start_worker(root / name, name, env))
            stops.append(workers[-1])
        yield Node("celery", api, slots=2)
    finally:
        for proc in reversed(stops):
            proc.stop()


def echo(text: str, **extra: Any) -> dict[str, Any]:
    return {"text": text, "steps": 1, "delay_s": 0.0, **extra}


def job(c: httpx.Client, job_id: str) -> dict[str, Any]:
    data: dict[str, Any] = c.get(f"/v1/jobs/{job_id}").json()
    return data


def terminal(c: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        data = job(c, job_id)
        return data if data["status"] in TERMINAL else None

    done: dict[str, Any] = wait_for(check, timeout=timeout, interval=0.05)
    return done


def submit(c: httpx.Client, body: dict[str, Any], **headers: str) -> str:
    r = c.post(ECHO, json={**body, "mode": "async"}, headers=headers)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    return job_id


def occupy(c: httpx.Client, node: Node, seconds: float = 3.0) -> list[str]:
    """Every slot busy with a job of about ``seconds``; returns their ids once all run."""
    steps = max(1, int(seconds / 0.1))
    ids = [submit(c, echo(f"blocker {i}", steps=steps, delay_s=0.1)) for i in range(node.slots)]
    wait_for(lambda: all(job(c, i)["status"] == "running" for i in ids), timeout=30, interval=0.05)
    return ids


def key(name: str, node: Node) -> str:
    return f"{name}-{node.backend}-{time.time_ns()}"


# -- 2. idempotent submits ------------------------------------------------------------------------
def test_an_async_repeat_with_the_key_gets_the_first_job(node: Node) -> None:
    with node.client() as c:
        k = key("async", node)
        first = c.post(ECHO, json=echo("idem", mode="async"), headers={"Idempotency-Key": k})
        assert first.status_code == 202, first.text
        assert "Idempotent-Replayed" not in first.headers
        # Same JSON, other key order and spacing: the same request.
        again = c.post(
            ECHO,
            content=b'{"mode": "async", "delay_s": 0.0, "steps": 1,  "text": "idem"}',
            headers={"Idempotency-Key": k, "Content-Type": "application/json"},
        )
        assert again.status_code == 202, again.text
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json() == first.json()
        assert again.headers["Location"] == first.headers["Location"]
        other = c.post(ECHO, json=echo("idem 2", mode="async"), headers={"Idempotency-Key": k})
        assert other.status_code == 422, other.text
        assert other.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
        assert first.json()["job_id"] in other.json()["detail"][0]["msg"]
        listed = c.get("/v1/jobs", params={"type": "echo", "limit": 200}).json()["jobs"]
        assert [j["id"] for j in listed if j["params"]["text"] == "idem"].count(
            first.json()["job_id"]
        ) == 1
        assert len([j for j in listed if j["params"]["text"] == "idem"]) == 1


def test_a_sync_repeat_answers_the_first_jobs_answer(node: Node) -> None:
    with node.client() as c:
        k = key("sync", node)
        headers = {"Idempotency-Key": k, "Accept": "application/json"}
        first = c.post(ECHO, json=echo("sync idem"), headers=headers)
        assert first.status_code == 200, first.text
        again = c.post(ECHO, json=echo("sync idem"), headers=headers)
        assert again.status_code == 200
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]
        # A failed job's answer (500) is replayed as such, without running it again.
        k2 = key("sync-fail", node)
        failed = c.post(ECHO, json=echo("boom", fail=True), headers={"Idempotency-Key": k2})
        assert failed.status_code == 500
        replay = c.post(ECHO, json=echo("boom", fail=True), headers={"Idempotency-Key": k2})
        assert replay.status_code == 500
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert replay.json()["job_id"] == failed.json()["job_id"]


def test_concurrent_duplicates_make_one_job(node: Node) -> None:
    k = key("race", node)
    answers: list[httpx.Response] = []
    barrier = threading.Barrier(8)

    def post() -> None:
        with node.client() as c:
            barrier.wait()
            answers.append(
                c.post(ECHO, json=echo("race", mode="async"), headers={"Idempotency-Key": k})
            )

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in answers] == [202] * 8
    assert len({r.json()["job_id"] for r in answers}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in answers) == 7


@pytest.mark.parametrize("bad", ["", "x" * 256, "tab\there", "caf\u00e9"])
def test_a_malformed_key_is_refused_naming_the_header(node: Node, bad: str) -> None:
    with node.client() as c:
        r = c.post(
            ECHO,
            json=echo("bad key", mode="async"),
            headers=[("Idempotency-Key", bad.encode("latin-1"))],
        )
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]


def test_keys_expire(node: Node) -> None:
    with node.client() as c:
        k = key("ttl", node)
        first = c.post(ECHO, json=echo("ttl", mode="async"), headers={"Idempotency-Key": k})
        time.sleep(IDEMPOTENCY_TTL_S + 0.5)
        later = c.post(ECHO, json=echo("ttl", mode="async"), headers={"Idempotency-Key": k})
        assert later.status_code == 202
        assert "Idempotent-Replayed" not in later.headers
        assert later.json()["job_id"] != first.json()["job_id"]


# -- 3. bounded waits ---------------------------------------------------------------------------
def test_prefer_respond_async_answers_202_at_once(node: Node) -> None:
    with node.client() as c:
        r = c.post(
            ECHO,
            json=echo("prefer", steps=10, delay_s=0.1),
            headers={"Prefer": "foo=bar, RESPOND-ASYNC"},
        )
        assert r.status_code == 202, r.text
        assert r.headers["Preference-Applied"] == "respond-async"
        body = r.json()
        assert body["job_id"] == body["id"] and body["status"] in ("queued", "running")
        assert r.headers["Location"] == f"/v1/jobs/{body['id']}"
        assert terminal(c, body["id"])["status"] == "succeeded"


def test_prefer_wait_caps_the_wait_then_answers_the_job(node: Node) -> None:
    with node.client() as c:
        started = time.monotonic()
        r = c.post(ECHO, json=echo("wait", steps=30, delay_s=0.1), headers={"Prefer": "wait=1"})
        took = time.monotonic() - started
        assert r.status_code == 202, r.text
        assert r.headers["Preference-Applied"] == "wait=1"
        assert r.json()["status"] in ("queued", "running")
        assert took < 2.9  # the job takes 3 s: the answer came before it ended
        assert terminal(c, r.json()["id"])["status"] == "succeeded"
        # Finished within the wait: the usual sync answer.
        quick = c.post(ECHO, json=echo("quick"), headers={"Prefer": "wait=10"})
        assert quick.status_code == 200
        assert "Preference-Applied" not in quick.headers


def test_the_servers_own_timeout_still_answers_504(node: Node) -> None:
    with node.client() as c:
        r = c.post(
            ECHO,
            json=echo("slow", steps=60, delay_s=0.1),
            headers={"Prefer": f"wait={SYNC_TIMEOUT_S + 5}"},
        )
        assert r.status_code == 504, r.text
        c.delete(f"/v1/jobs/{r.json()['job_id']}")


def test_prefer_parsing_follows_rfc_7240() -> None:
    assert parse_prefer(['respond-async; foo="x", Wait=10', "wait=3, return=minimal"]) == {
        "respond-async": "",
        "wait": "10",
        "return": "minimal",
    }
    assert parse_cancel_after("1h30m") == 5400
    assert parse_cancel_after("500ms") == 0.5
    assert parse_cancel_after(" 2.5 ") == 2.5
    for bad in ("0", "-1", "soon", "1d", "nan", "inf", "1e9"):
        with pytest.raises(ValueError):
            parse_cancel_after(bad)


# -- 4. deadlines ---------------------------------------------------------------------------------
def test_a_job_not_started_by_its_deadline_never_runs(node: Node) -> None:
    with node.client() as c:
        blockers = occupy(c, node)
        late = submit(c, echo("too late"), **{"Cancel-After": "500ms"})
        queued = job(c, late)
        assert queued["status"] == "queued" and queued["deadline"] is not None
        # Canceled while every slot is still busy: by the sweep, not by a worker's claim.
        done = terminal(c, late, timeout=2.5)
        assert done["status"] == "canceled"
        assert done["error"] == "deadline passed before start"
        assert all(job(c, b)["status"] == "running" for b in blockers)
        for b in blockers:
            terminal(c, b)
        assert job(c, late)["started_at"] is None


def test_a_running_job_past_its_deadline_is_canceled_at_its_next_step(node: Node) -> None:
    with node.client() as c:
        r = c.post(
            ECHO,
            json=echo("deadline", steps=50, delay_s=0.1),
            headers={"Cancel-After": "1", "Accept": "application/json"},
        )
        assert r.status_code == 409, r.text
        done = terminal(c, r.json()["job_id"])
        assert done["status"] == "canceled"
        assert "deadline" in done["error"] and "running" in done["error"]
        assert done["started_at"] is not None and done["finished_at"] < done["created_at"] + 4
        assert done["artifacts"] == []


@pytest.mark.parametrize("bad", ["0", "later", "-5", "1e12"])
def test_a_bad_cancel_after_is_refused_naming_the_header(node: Node, bad: str) -> None:
    with node.client() as c:
        r = c.post(ECHO, json=echo("x", mode="async"), headers={"Cancel-After": bad})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["header", "Cancel-After"]


# -- 5. retry and priority ------------------------------------------------------------------------
def test_retry_makes_a_linked_job_of_a_failed_one(node: Node) -> None:
    with node.client() as c:
        failed = terminal(c, submit(c, echo("retry me", fail=True, steps=2)))
        assert failed["status"] == "failed" and failed["retried_by"] is None
        r = c.post(f"/v1/jobs/{failed['id']}/retry", headers={"X-Kiapi-Priority": "2"})
        assert r.status_code == 202, r.text
        new = r.json()
        assert new["retry_of"] == failed["id"] and new["params"] == failed["params"]
        assert new["priority"] == 2 and r.headers["Location"] == f"/v1/jobs/{new['id']}"
        assert job(c, failed["id"])["retried_by"] == new["id"]
        assert terminal(c, new["id"])["status"] == "failed"  # same params: fails again
        again = c.post(f"/v1/jobs/{failed['id']}/retry")
        assert again.status_code == 409 and again.json()["retried_by"] == new["id"]
        ok = terminal(c, submit(c, echo("fine")))
        refused = c.post(f"/v1/jobs/{ok['id']}/retry")
        assert refused.status_code == 409 and refused.json()["status"] == "succeeded"
        assert c.post("/v1/jobs/job_0123456789abcdef/retry").status_code == 404
        # A canceled job can be retried too; a queued one cannot.
        blockers = occupy(c, node, 1.5)
        queued = submit(c, echo("queued"))
        assert c.post(f"/v1/jobs/{queued}/retry").status_code == 409
        c.delete(f"/v1/jobs/{queued}")
        retried = c.post(f"/v1/jobs/{queued}/retry")
        assert retried.status_code == 202
        assert terminal(c, retried.json()["id"])["status"] == "succeeded"
        for b in blockers:
            terminal(c, b)


def test_priority_orders_the_queue_ahead_of_fifo(node: Node) -> None:
    with node.client() as c:
        blockers = occupy(c, node, 3.0)
        a = submit(c, echo("a"))
        b = submit(c, echo("b"))
        high = submit(c, echo("high"), **{"X-Kiapi-Priority": "5"})
        low = submit(c, echo("low"), **{"X-Kiapi-Priority": "-1"})
        patched = c.patch(f"/v1/jobs/{b}", json={"priority": 3})
        assert patched.status_code == 200, patched.text
        assert patched.json()["priority"] == 3
        positions = {j: job(c, j)["queue_position"] for j in (a, b, high, low)}
        assert positions == {high: 1, b: 2, a: 3, low: 4}
        assert c.patch(f"/v1/jobs/{blockers[0]}", json={"priority": 1}).status_code == 409
        bad = c.patch(f"/v1/jobs/{a}", json={"priority": 11})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "priority"]
        refused = c.post(ECHO, json=echo("x", mode="async"), headers={"X-Kiapi-Priority": "x"})
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["loc"] == ["header", "X-Kiapi-Priority"]
        done = [terminal(c, j) for j in (a, b, high, low)]
        order = [d["id"] for d in sorted(done, key=lambda d: d["started_at"])]
        assert order == [high, b, a, low]
        assert job(c, b)["queue_position"] is None
        assert c.patch(f"/v1/jobs/{b}", json={"priority": 1}).status_code == 409
