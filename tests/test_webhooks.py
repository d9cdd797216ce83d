"""Webhooks end to end on real servers: a threaded receiver here verifies every signature with
its own Standard Webhooks implementation (not kiapi's), on both backends."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import LiveServer, run_cli, wait_for

from kiapi_core.testing import free_port

ECHO = "/v1/text/echo/run"
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()
FAST = {"KIAPI_WEBHOOK_BACKOFF_S": "0.3", "KIAPI_WEBHOOK_BACKOFF_MAX_S": "1"}


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Receiver:
    """A webhook receiver: records every POST, answers the queued statuses (then 200)."""

    port: int
    hits: list[Hit] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.hits.append(Hit(self.path, headers, body, time.time()))
                status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", f"http://127.0.0.1:{receiver.port}/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def events(self, job_id: str) -> list[str]:
        return [h.json["event"] for h in self.hits if h.json.get("id") == job_id]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port()).start()
    yield r
    r.stop()


def verify(hit: Hit, secret: str, tolerance_s: float = 300) -> bool:
    """The Standard Webhooks check, written from the spec: any v1 signature in the header
    that matches HMAC-SHA256(key, "id.timestamp.body") with the base64 key after whsec_."""
    msg_id, ts = hit.headers["webhook-id"], hit.headers["webhook-timestamp"]
    if abs(time.time() - int(ts)) > tolerance_s:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{ts}.".encode() + hit.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for part in hit.headers["webhook-signature"].split(" "):
        version, _, sig = part.partition(",")
        if version == "v1" and hmac.compare_digest(sig, expected):
            return True
    return False


def submit(c: httpx.Client, headers: dict[str, str] | None = None, **body: Any) -> str:
    payload = {"text": "hi", "steps": 2, "delay_s": 0.01, "mode": "async", **body}
    r = c.post(ECHO, json=payload, headers=headers or {})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    return job_id


def delivered(c: httpx.Client, job_id: str, count: int, timeout: float = 30) -> dict[str, Any]:
    """The job once it ended and its ``count`` or more deliveries (a completed one among them)
    were all delivered or failed."""

    def check() -> dict[str, Any] | None:
        job: dict[str, Any] = c.get(f"/v1/jobs/{job_id}").json()
        hook = job.get("webhook") or {}
        shown = hook.get("deliveries") or []
        settled = all(d["status"] != "pending" for d in shown)
        ended = any(d["event"] == "completed" for d in shown)
        finished = job["status"] in ("succeeded", "failed")
        return job if finished and ended and settled and len(shown) >= count else None

    found: dict[str, Any] = wait_for(check, timeout=timeout)
    return found


def test_start_and_completed_are_delivered_signed(live_server: Any, receiver: Receiver) -> None:
    server = live_server({"KIAPI_WEBHOOK_SECRET": SECRET})
    with server.client() as c:
        job_id = submit(c, {"X-Kiapi-Webhook": receiver.url})
        job = delivered(c, job_id, 2)
    # The default filter: start and completed, no progress.
    assert receiver.events(job_id) == ["start", "completed"]
    for hit in receiver.hits:
        assert verify(hit, SECRET), hit.headers
        assert not verify(hit, OLD_SECRET)
        assert hit.headers["content-type"] == "application/json"
    start, end = (h.json for h in receiver.hits)
    assert start["status"] == "running" and end["status"] == "succeeded", end["error"]
    assert end["result"]["text"] == "hi" and end["webhook"]["url"] == receiver.url
    ids = [h.headers["webhook-id"] for h in receiver.hits]
    assert len(set(ids)) == 2
    hook = job["webhook"]
    assert hook["url"] == receiver.url and hook["events"] == ["start", "completed"]
    assert [(d["event"], d["status"], d["attempts"]) for d in hook["deliveries"]] == [
        ("start", "delivered", 1),
        ("completed", "delivered", 1),
    ]
    assert [d["id"] for d in hook["deliveries"]] == ids
    assert all(d["last_status_code"] == 200 and d["delivered_at"] for d in hook["deliveries"])
    # The check is not vacuous: one byte changed and it fails.
    first = receiver.hits[0]
    assert not verify(Hit(first.path, first.headers, first.body + b" ", 0), SECRET)
    # The few lines docs/jobs.md shows verify a real delivery too.
    documented = docs_verify()
    assert documented(SECRET, first.headers, first.body)
    assert not documented(OLD_SECRET, first.headers, first.body)


def docs_verify() -> Any:
    text = (Path(__file__).parents[1] / "docs" / "jobs.md").read_text()
    section = text.split("## Webhooks", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(code, scope)
    return scope["verify"]


def test_body_fields_filter_and_progress_rate_limit(live_server: Any, receiver: Receiver) -> None:
    server = live_server(
        {"KIAPI_WEBHOOK_SECRET": SECRET, "KIAPI_WEBHOOK_PROGRESS_INTERVAL_MS": "0"}
    )
    with server.client() as c:
        # Every step reported; progress at most once per 300 ms, no start event.
        job_id = submit(
            c,
            steps=20,
            delay_s=0.05,
            webhook=receiver.url,
            webhook_events_filter=["progress=300ms", "completed"],
        )
        job = delivered(c, job_id, 2)
        events = receiver.events(job_id)
        assert job["webhook"]["events"] == ["progress", "completed"]
        assert "start" not in events and events[-1] == "completed"
        progress = [h for h in receiver.hits if h.json["event"] == "progress"]
        ran_s = job["finished_at"] - job["started_at"]
        assert 1 <= len(progress) <= ran_s / 0.3 + 1
        assert len(progress) < 20
        # Each progress event carries the job as it was then.
        assert all(h.json["status"] == "running" for h in progress)
        assert all(verify(h, SECRET) for h in receiver.hits)
        # No webhook: no field, nothing sent.
        quiet = submit(c)
        wait_for(lambda: c.get(f"/v1/jobs/{quiet}").json()["status"] == "succeeded")
        assert c.get(f"/v1/jobs/{quiet}").json()["webhook"] is None


def test_a_500_is_retried_with_backoff_then_delivered(live_server: Any, receiver: Receiver) -> None:
    server = live_server({"KIAPI_WEBHOOK_SECRET": SECRET, **FAST})
    receiver.answers = [500]
    with server.client() as c:
        job_id = submit(c, {"X-Kiapi-Webhook": receiver.url, "X-Kiapi-Webhook-Events": "completed"})
        job = delivered(c, job_id, 1)
    (delivery,) = job["webhook"]["deliveries"]
    assert delivery["status"] == "delivered" and delivery["attempts"] == 2
    assert delivery["last_status_code"] == 200
    first, second = receiver.hits
    # The same message both times (receivers dedupe on webhook-id), re-signed at its attempt.
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == delivery["id"]
    assert first.body == second.body
    assert verify(first, SECRET) and verify(second, SECRET)
    # Backoff: at least half of KIAPI_WEBHOOK_BACKOFF_S (the jitter's floor) in between.
    assert second.at - first.at >= 0.15


def test_receiver_down_across_a_server_restart(live_server: Any, tmp_path: Path) -> None:
    port = free_port()
    home = tmp_path / "restart-home"
    env = {"KIAPI_WEBHOOK_SECRET": SECRET, **FAST, "KIAPI_WEBHOOK_MAX_ATTEMPTS": "100"}
    server = live_server(env, home=home)
    url = f"http://127.0.0.1:{port}/hook"
    with server.client() as c:
        job_id = submit(c, {"X-Kiapi-Webhook": url, "X-Kiapi-Webhook-Events": "completed"})

        def failed_once() -> dict[str, Any] | None:
            hook = c.get(f"/v1/jobs/{job_id}").json()["webhook"]
            d = (hook.get("deliveries") or [None])[0]
            return d if d and d["attempts"] >= 1 else None

        pending = wait_for(failed_once)
    assert pending["status"] == "pending" and pending["last_error"]
    assert pending["next_attempt_at"] is not None
    server.stop()
    receiver = Receiver(port).start()
    try:
        server = live_server(env, home=home)
        with server.client() as c:
            job = delivered(c, job_id, 1)
        (delivery,) = job["webhook"]["deliveries"]
        assert delivery["status"] == "delivered" and delivery["attempts"] >= 2
        assert receiver.events(job_id) == ["completed"]
        assert verify(receiver.hits[0], SECRET)
    finally:
        receiver.stop()


def test_targets_outside_the_allow_list_are_refused(live_server: Any, receiver: Receiver) -> None:
    server = live_server()
    with server.client() as c:
        cases = [
            ({"X-Kiapi-Webhook": "http://10.0.0.1/hook"}, {}, ["header", "X-Kiapi-Webhook"]),
            ({"X-Kiapi-Webhook": "http://example.com/hook"}, {}, ["header", "X-Kiapi-Webhook"]),
            ({"X-Kiapi-Webhook": "ftp://127.0.0.1/hook"}, {}, ["header", "X-Kiapi-Webhook"]),
            ({"X-Kiapi-Webhook": "http://user:pw@127.0.0.1/"}, {}, ["header", "X-Kiapi-Webhook"]),
            ({}, {"webhook": "http://192.168.1.1/x"}, ["body", "webhook"]),
            (
                {"X-Kiapi-Webhook": receiver.url, "X-Kiapi-Webhook-Events": "start,output"},
                {},
                ["header", "X-Kiapi-Webhook-Events"],
            ),
            ({}, {"webhook_events_filter": ["start"]}, ["body", "webhook_events_filter"]),
        ]
        for headers, body, loc in cases:
            r = c.post(ECHO, json={"text": "x", "mode": "async", **body}, headers=headers)
            assert r.status_code == 422, (headers, body, r.text)
            (problem,) = r.json()["detail"]
            assert problem["loc"] == loc, problem
        assert (
            "KIAPI_WEBHOOK_ALLOW"
            in c.post(
                ECHO, json={"text": "x"}, headers={"X-Kiapi-Webhook": "http://10.0.0.1/"}
            ).text
        )
        # The OpenAI route answers in OpenAI's shape.
        r = c.post(
            "/v1/images/generations",
            json={"prompt": "x"},
            headers={"X-Kiapi-Webhook": "http://10.0.0.1/"},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Kiapi-Webhook"
        # The model plugins' body fields: refused before any availability check (503).
        for path in ("/v1/image/ideogram4/generate", "/v1/image/zimage/generate"):
            r = c.post(path, json={"prompt": "x", "webhook": "http://10.0.0.1/"})
            assert r.status_code == 422, (path, r.text)
            assert r.json()["detail"][0]["loc"] == ["body", "webhook"]
        doc = c.get("/openapi.json").json()
        for name in ("GenerateRequest", "ZImageGenerateRequest"):
            fields = doc["components"]["schemas"][name]["properties"]
            assert {"webhook", "webhook_events_filter"} <= set(fields)
        assert {"X-Kiapi-Webhook", "X-Kiapi-Webhook-Events"} <= set(doc["components"]["parameters"])
        # Nothing was queued by any refused submit.
        assert c.get("/v1/jobs").json()["jobs"] == []
    assert receiver.hits == []


def test_a_redirect_is_not_followed(live_server: Any, receiver: Receiver) -> None:
    server = live_server(
        {"KIAPI_WEBHOOK_SECRET": SECRET, **FAST, "KIAPI_WEBHOOK_MAX_ATTEMPTS": "2"}
    )
    receiver.answers = [302, 302]
    with server.client() as c:
        job_id = submit(c, {"X-Kiapi-Webhook": receiver.url, "X-Kiapi-Webhook-Events": "completed"})
        job = delivered(c, job_id, 1)
    (delivery,) = job["webhook"]["deliveries"]
    assert delivery["status"] == "failed" and delivery["attempts"] == 2
    assert delivery["last_status_code"] == 302 and "not followed" in delivery["last_error"]
    assert [h.path for h in receiver.hits] == ["/hook", "/hook"]


def test_secret_generated_kept_and_rotated(
    live_server: Any, receiver: Receiver, tmp_path: Path
) -> None:
    home = tmp_path / "rotate-home"
    server = live_server(home=home)
    env = {"KIAPI_HOME": str(home)}
    with server.client() as c:
        first = submit(c, {"X-Kiapi-Webhook": receiver.url, "X-Kiapi-Webhook-Events": "completed"})
        delivered(c, first, 1)
    secrets_file = home / "webhook_secrets"
    assert secrets_file.stat().st_mode & 0o777 == 0o600
    shown = run_cli("webhooks", "secret", env=env)
    assert shown.returncode == 0, shown.stderr
    (generated,) = shown.stdout.split()
    assert verify(receiver.hits[0], generated)
    masked = run_cli("config", env=env).stdout
    assert generated not in masked
    assert f"webhook secrets in {secrets_file}" in masked and f"whsec_…{generated[-4:]}" in masked

    rotated = run_cli("webhooks", "rotate", env=env)
    assert rotated.returncode == 0, rotated.stderr
    newest, previous = rotated.stdout.split()
    assert previous == generated and newest != generated
    with server.client() as c:
        second = submit(c, {"X-Kiapi-Webhook": receiver.url, "X-Kiapi-Webhook-Events": "completed"})
        delivered(c, second, 1)
    hit = receiver.hits[-1]
    # During the rotation both sign: a receiver on either secret verifies.
    assert len(hit.headers["webhook-signature"].split(" ")) == 2
    assert verify(hit, newest) and verify(hit, generated)

    # Kept across a restart: the same secrets sign after it.
    server.stop()
    assert run_cli("webhooks", "rotate", "--drop-old", env=env).stdout.split() == [newest]
    server = live_server(home=home)
    with server.client() as c:
        third = submit(c, {"X-Kiapi-Webhook": receiver.url, "X-Kiapi-Webhook-Events": "completed"})
        delivered(c, third, 1)
    hit = receiver.hits[-1]
    assert verify(hit, newest) and not verify(hit, generated)


def test_retry_keeps_the_webhook_and_the_server_default_applies(
    live_server: Any, receiver: Receiver
) -> None:
    server = live_server(
        {
            "KIAPI_WEBHOOK_SECRET": f"{SECRET},{OLD_SECRET}",
            "KIAPI_WEBHOOK_URL": receiver.url,
            "KIAPI_WEBHOOK_EVENTS": "completed",
        }
    )
    with server.client() as c:
        failed = submit(c, fail=True, steps=4)
        job = delivered(c, failed, 1)
        assert job["status"] == "failed" and job["webhook"]["url"] == receiver.url
        r = c.post(f"/v1/jobs/{failed}/retry")
        assert r.status_code == 202, r.text
        retry = r.json()["id"]
        again = delivered(c, retry, 1)
        assert again["webhook"]["events"] == ["completed"]
    assert receiver.events(failed) == ["completed"] and receiver.events(retry) == ["completed"]
    assert receiver.hits[0].json["status"] == "failed"
    # Two configured secrets: both sign.
    assert all(verify(h, SECRET) and verify(h, OLD_SECRET) for h in receiver.hits)


# -- the celery backend ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from kiapi_core.testing.redis import start_redis

    server = start_redis(tmp_path_factory.mktemp("webhooks-redis"))
    yield server
    server.stop()


def _celery_env(redis_server: Any, root: Path, prefix: str, **extra: str) -> dict[str, str]:
    return {
        "KIAPI_BACKEND": "celery",
        "KIAPI_REDIS_URL": redis_server.url,
        "KIAPI_REDIS_PREFIX": prefix,
        "KIAPI_FILES_DIR": str(root / "shared-files"),
        "KIAPI_PLUGINS": "echo",
        "KIAPI_WEBHOOK_SECRET": SECRET,
        "KIAPI_WORKER_NICE": "0",
        **FAST,
        **extra,
    }


def test_celery_a_kiapi_worker_delivers(
    live_server: Any, receiver: Receiver, redis_server: Any, tmp_path: Path
) -> None:
    from kiapi_core.testing.redis import start_worker

    env = _celery_env(redis_server, tmp_path, "wh-worker")
    # The API node delivers nothing: what arrives came from the worker.
    api: LiveServer = live_server({**env, "KIAPI_WEBHOOK_DELIVER": "false"})
    worker = start_worker(tmp_path / "worker", "hooks", env)
    receiver.answers = [500]
    try:
        with api.client() as c:
            job_id = submit(
                c,
                {
                    "X-Kiapi-Webhook": receiver.url,
                    "X-Kiapi-Webhook-Events": "start,progress,completed",
                },
            )
            job = delivered(c, job_id, 3)
    finally:
        worker.stop()
    events = receiver.events(job_id)
    assert events[0] == "start" and events[-1] == "completed" and "progress" in events
    assert all(verify(h, SECRET) for h in receiver.hits)
    by_event = {d["event"]: d for d in job["webhook"]["deliveries"]}
    assert by_event["start"]["attempts"] == 2  # the 500, then the retry
    assert all(d["status"] == "delivered" for d in job["webhook"]["deliveries"])
    assert job["webhook"]["deliveries"][-1]["event"] == "completed"


def test_celery_api_node_and_worker_each_delivery_sent_once(
    live_server: Any, receiver: Receiver, redis_server: Any, tmp_path: Path
) -> None:
    from kiapi_core.testing.redis import start_worker

    env = _celery_env(redis_server, tmp_path, "wh-both")
    api: LiveServer = live_server(env)
    worker = start_worker(tmp_path / "worker", "both", env)
    try:
        with api.client() as c:
            ids = [
                submit(c, {"X-Kiapi-Webhook": receiver.url}, steps=1, delay_s=0) for _ in range(6)
            ]
            for job_id in ids:
                delivered(c, job_id, 2)
    finally:
        worker.stop()
    sent = [h.headers["webhook-id"] for h in receiver.hits]
    assert len(sent) == 12 and len(set(sent)) == 12
    # One job's events in order, even with two deliverers.
    assert all(receiver.events(j) == ["start", "completed"] for j in ids)
    assert all(verify(h, SECRET) for h in receiver.hits)


def test_names_are_resolved_and_rechecked_at_each_attempt(
    live_server: Any, receiver: Receiver, tmp_path: Path
) -> None:
    url = f"http://localhost:{receiver.port}/hook"
    # Networks only: the name is looked up at submit, all its addresses must be allowed; the
    # request goes to the address checked, the name in Host.
    server = live_server(
        {"KIAPI_WEBHOOK_SECRET": SECRET, "KIAPI_WEBHOOK_ALLOW": "127.0.0.0/8,::1"},
        home=tmp_path / "networks",
    )
    with server.client() as c:
        job_id = submit(c, {"X-Kiapi-Webhook": url, "X-Kiapi-Webhook-Events": "completed"})
        delivered(c, job_id, 1)
    assert receiver.hits[-1].headers["host"] == f"localhost:{receiver.port}"
    assert verify(receiver.hits[-1], SECRET)
    server.stop()
    # A name allowed by name only: at delivery it resolves into loopback, which no network
    # entry allows (what a rebinding to an internal address looks like), and nothing is sent.
    server = live_server(
        {"KIAPI_WEBHOOK_ALLOW": "localhost", "KIAPI_WEBHOOK_MAX_ATTEMPTS": "1"},
        home=tmp_path / "names",
    )
    before = len(receiver.hits)
    with server.client() as c:
        job_id = submit(c, {"X-Kiapi-Webhook": url, "X-Kiapi-Webhook-Events": "completed"})
        job = delivered(c, job_id, 1)
        refused = c.post(ECHO, json={"text": "x"}, headers={"X-Kiapi-Webhook": "http://127.0.0.1/"})
    (delivery,) = job["webhook"]["deliveries"]
    assert delivery["status"] == "failed" and "internal address" in delivery["last_error"]
    assert len(receiver.hits) == before
    assert refused.status_code == 422
