"""Jobs over HTTP: Job JSON, /v1/jobs, cancel, SSE, the job helper, the worker thread, the seam."""

from __future__ import annotations

import inspect
import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from helpers import documented, run_cli
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from kiapi_core import Capability, hookimpl
from kiapi_core.app import create_app
from kiapi_core.files.store import FileStore
from kiapi_core.jobs.context import JobContext
from kiapi_core.jobs.events import JobEvents
from kiapi_core.jobs.fanout import KEEPALIVE_ITEM
from kiapi_core.jobs.respond import respond_with_job
from kiapi_core.jobs.service import Dispatcher, JobService
from kiapi_core.jobs.sse import open_job_stream
from kiapi_core.jobs.store import JobRecord, JobStore, QueueFull, SqliteJobStore
from kiapi_core.runtime.threads import WorkerPool
from kiapi_core.settings import Settings
from kiapi_core.state.sqlite import Database
from kiapi_core.testing import wait_for

CONTRACT = Path("/work/shared/ideogram4.openapi.json")
ECHO = "/v1/text/echo/run"
JOB_ID = re.compile(r"^job_[0-9a-f]{16}$")
FILE_ID = re.compile(r"^file_[0-9a-f]{16}$")
CONTRACT_FIELDS = {
    "type",
    "params",
    "id",
    "status",
    "result",
    "artifacts",
    "error",
    "created_at",
    "started_at",
    "finished_at",
    "progress",
    "progress_label",
}
# kiapi's extensions (issue 17: priority, deadline, retry links).
JOB_FIELDS = CONTRACT_FIELDS | {"queue_position", "priority", "deadline", "retry_of", "retried_by"}
JOB_FIELDS |= {"webhook"}
JOB_FIELDS |= {"eta_s", "estimated_start_at"}
JOB_FIELDS |= {"keep_alive"}
TERMINAL = {"succeeded", "failed", "canceled"}
# Bounds for "answers promptly": generous, because the test machine is small and noisy.
PROMPT_S = 1.0


# -- helpers ------------------------------------------------------------------------------------


async def _run_named(request: Request) -> Response:
    return await respond_with_job(request, job_type="named", params={}, media_type="text/plain")


_NAMED = Route("/v1/test/named/run", _run_named, methods=["POST"])


class SlowSaver:
    """A test plugin whose job saves its file first and then keeps reporting progress.

    Unlike echo (which saves at the very end), a cancel here must also remove a file
    that already exists.
    """

    @hookimpl
    def register_job_handlers(self, register: Callable[[str, Any], None]) -> None:
        register("slowsave", self.run)
        register("exits", self.exits)
        register("named", self.named)

    @hookimpl
    def register_capabilities(self, register: Callable[[Capability], None]) -> None:
        register(Capability(name="named", domain="test"))

    @hookimpl
    def register_routes(self) -> list[Route]:
        return [_NAMED]

    @hookimpl
    def register_openapi(self) -> dict[str, Any]:
        return documented(_NAMED)

    @staticmethod
    def named(ctx: JobContext) -> dict[str, Any]:
        info = ctx.save_file(
            "données".encode(), filename="résumé 2024.txt", content_type="text/plain; charset=utf-8"
        )
        return {"file_id": info.id}

    @staticmethod
    def exits(ctx: JobContext) -> dict[str, Any]:
        raise SystemExit(3)

    @staticmethod
    def run(ctx: JobContext) -> dict[str, Any]:
        info = ctx.save_file(
            b"partial output", filename="partial.bin", content_type="application/octet-stream"
        )
        for step in range(ctx.params.get("steps", 400)):
            time.sleep(0.02)
            ctx.progress((step + 1) / 400, "working")
        return {"file_id": info.id}


@contextmanager
def app_client(make_settings: Callable[..., Settings], **overrides: Any) -> Iterator[TestClient]:
    """A TestClient whose unfinished jobs are canceled before shutdown (keeps teardown fast)."""
    app = create_app(make_settings(**overrides), extra_plugins=[("slowsave", SlowSaver())])
    with TestClient(app) as c:
        try:
            yield c
        finally:
            for job in c.get("/v1/jobs", params={"limit": 500}).json()["jobs"]:
                if job["status"] not in TERMINAL:
                    c.delete(f"/v1/jobs/{job['id']}")
            wait_for(
                lambda: all(
                    j["status"] in TERMINAL
                    for j in c.get("/v1/jobs", params={"limit": 500}).json()["jobs"]
                ),
                15,
            )


def submit(c: TestClient | httpx.Client, **body: Any) -> str:
    r = c.post(ECHO, json={"text": "hello", "mode": "async", **body})
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def get(c: TestClient | httpx.Client, job_id: str) -> dict[str, Any]:
    r = c.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    job: dict[str, Any] = r.json()
    return job


def wait_status(
    c: TestClient | httpx.Client, job_id: str, *statuses: str, timeout: float = 20
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = get(c, job_id)
        return job if job["status"] in statuses else None

    job: dict[str, Any] = wait_for(check, timeout)
    return job


def wait_progress(c: TestClient | httpx.Client, job_id: str) -> dict[str, Any]:
    """Wait until the job is running and has reported at least one step."""

    def check() -> dict[str, Any] | None:
        job = get(c, job_id)
        return job if job["status"] == "running" and (job["progress"] or 0) > 0 else None

    job: dict[str, Any] = wait_for(check, 20)
    return job


def schema_validator(doc: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    """A validator for ``components.schemas[name]`` with its ``$ref``s resolved in ``doc``."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate_job(doc: dict[str, Any], job: dict[str, Any]) -> None:
    schema_validator(doc, "Job").validate(job)
    assert set(job) == JOB_FIELDS
    assert JOB_ID.fullmatch(job["id"])
    assert all(FILE_ID.fullmatch(f) for f in job["artifacts"])
    if job["status"] == "queued":
        assert isinstance(job["queue_position"], int) and job["queue_position"] >= 1
        assert job["started_at"] is None and job["finished_at"] is None
    else:
        assert job["queue_position"] is None
    if job["status"] in TERMINAL:
        assert job["finished_at"] is not None
        assert job["created_at"] <= job["finished_at"]
    if job["started_at"] is not None:
        assert job["created_at"] <= job["started_at"]
        assert job["finished_at"] is None or job["started_at"] <= job["finished_at"]


@pytest.fixture
def doc(client: TestClient) -> dict[str, Any]:
    d: dict[str, Any] = client.get("/openapi.json").json()
    return d


# -- 1. the Job JSON ----------------------------------------------------------------------------
def _normalize(schema: Any, components: dict[str, Any]) -> Any:
    """A schema with $refs inlined and prose (description, title, examples) dropped."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            target = components[schema["$ref"].rsplit("/", 1)[-1]]
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            return _normalize({**target, **rest}, components)
        return {
            k: _normalize(v, components)
            for k, v in schema.items()
            if k not in ("description", "title", "examples")
        }
    if isinstance(schema, list):
        return [_normalize(v, components) for v in schema]
    return schema


def test_served_job_schema_is_the_contracts(doc: dict[str, Any]) -> None:
    contract = json.loads(CONTRACT.read_text())
    theirs = contract["components"]["schemas"]["JobImageResponse"]
    ours = doc["components"]["schemas"]["Job"]
    assert set(theirs["properties"]) == CONTRACT_FIELDS
    assert set(ours["properties"]) == JOB_FIELDS
    assert ours["required"] == theirs["required"] == ["type"]
    for name in CONTRACT_FIELDS - {"result"}:
        assert _normalize(ours["properties"][name], doc["components"]["schemas"]) == _normalize(
            theirs["properties"][name], contract["components"]["schemas"]
        ), name
    # The generic Job's result is any object (each capability narrows it), or null.
    assert _normalize(ours["properties"]["result"], {}) == {
        "anyOf": [{"type": "object", "additionalProperties": True}, {"type": "null"}]
    }
    for name in ("AsyncJobResponse",):
        assert _normalize(
            doc["components"]["schemas"][name], doc["components"]["schemas"]
        ) == _normalize(contract["components"]["schemas"][name], contract["components"]["schemas"])


def test_job_json_through_its_life(make_settings: Callable[..., Settings]) -> None:
    with app_client(make_settings, workers=1) as c:
        doc = c.get("/openapi.json").json()
        blocker = submit(c, steps=400, delay_s=0.02)
        running = wait_progress(c, blocker)
        validate_job(doc, running)
        assert running["started_at"] is not None and running["finished_at"] is None
        assert 0 < running["progress"] < 1 and running["progress_label"].startswith("step ")

        queued_ids = [submit(c, text=f"q{i}", steps=1, delay_s=0) for i in range(2)]
        queued = [get(c, j) for j in queued_ids]
        for position, job in enumerate(queued, start=1):
            validate_job(doc, job)
            assert job["status"] == "queued" and job["queue_position"] == position
            assert job["progress"] is None and job["progress_label"] == "queued"
            assert job["type"] == "echo" and job["result"] is None and job["artifacts"] == []
        assert queued[0]["params"] == {
            "text": "q0",
            "steps": 1,
            "delay_s": 0.0,
            "fail": False,
            "model": "echo-1",
        }

        assert c.delete(f"/v1/jobs/{blocker}").status_code == 202
        for job_id in queued_ids:
            done = wait_status(c, job_id, *TERMINAL)
            validate_job(doc, done)
            assert done["status"] == "succeeded"
            assert done["progress"] == 1.0 and done["progress_label"] == "done"
            assert done["error"] is None
            assert done["result"]["file_id"] == done["artifacts"][0]
        canceled = get(c, blocker)
        validate_job(doc, canceled)
        assert canceled["status"] == "canceled"

        failed = c.post(ECHO, json={"text": "x", "fail": True, "steps": 2, "delay_s": 0})
        validate_job(doc, get(c, failed.json()["job_id"]))


def test_async_receipt(client: TestClient, doc: dict[str, Any]) -> None:
    r = client.post(ECHO, json={"text": "a", "mode": "async", "steps": 1, "delay_s": 0})
    assert r.status_code == 202
    body = r.json()
    schema_validator(doc, "AsyncJobResponse").validate(body)
    assert set(body) == {"job_id", "type", "status"}
    assert JOB_ID.fullmatch(body["job_id"]) and body["type"] == "echo"
    assert body["status"] in ("queued", "running")
    assert r.headers["location"] == f"/v1/jobs/{body['job_id']}"
    assert wait_status(client, body["job_id"], *TERMINAL)["status"] == "succeeded"


def test_list_jobs_filters_and_pages(client: TestClient, doc: dict[str, Any]) -> None:
    ids = []
    for i in range(5):
        r = client.post(
            ECHO,
            json={"text": f"t{i}", "steps": 1, "delay_s": 0},
            headers={"Accept": "application/json"},
        )
        ids.append(r.json()["id"])
    r = client.post(ECHO, json={"text": "f", "fail": True, "steps": 1, "delay_s": 0})
    assert r.status_code == 500
    failed_id = r.json()["job_id"]
    newest_first = [failed_id, *reversed(ids)]

    listing = client.get("/v1/jobs").json()
    schema_validator(doc, "JobList").validate(listing)
    assert [j["id"] for j in listing["jobs"]] == newest_first
    assert listing["next_cursor"] is None
    created = [j["created_at"] for j in listing["jobs"]]
    assert created == sorted(created, reverse=True)

    def ids_of(**params: Any) -> list[str]:
        r = client.get("/v1/jobs", params=params)
        assert r.status_code == 200, r.text
        return [j["id"] for j in r.json()["jobs"]]

    assert ids_of(status="failed") == [failed_id]
    assert ids_of(status="succeeded") == list(reversed(ids))
    assert ids_of(status="queued") == []
    assert ids_of(type="echo") == newest_first
    assert ids_of(type="echo", status="failed") == [failed_id]
    assert ids_of(type="nope") == []

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/jobs", params=params).json()
        pages += 1
        assert len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str)
    assert pages == 3 and seen == newest_first
    page = client.get("/v1/jobs", params={"limit": 3, "status": "succeeded"}).json()
    assert len(page["jobs"]) == 3 and page["next_cursor"]
    rest = client.get(
        "/v1/jobs", params={"limit": 3, "status": "succeeded", "cursor": page["next_cursor"]}
    ).json()
    assert [j["id"] for j in page["jobs"] + rest["jobs"]] == list(reversed(ids))
    assert rest["next_cursor"] is None

    for bad in (
        {"status": "done"},
        {"limit": "0"},
        {"limit": "501"},
        {"limit": "x"},
        {"limit": "²"},
        {"cursor": "abc"},
        {"cursor": "-1"},
        {"cursor": "1" * 19},
    ):
        r = client.get("/v1/jobs", params=bad)
        assert r.status_code == 422, bad
        assert r.json()["detail"][0]["loc"][0] == "query"


@pytest.mark.parametrize(
    "job_id",
    [
        "job_0123456789abcdef",  # well-formed, unknown
        "job_0123456789ABCDEF",
        "job_123",
        "job_0123456789abcdef0",
        "file_0123456789abcdef",
        "..",
        "%2e%2e",
        "job_0123456789abcde%00",
        "x" * 5000,
    ],
)
def test_unknown_or_malformed_job_id_is_404(client: TestClient, job_id: str) -> None:
    for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/events")):
        if job_id == ".." and suffix:
            continue  # /v1/jobs/../events is /v1/events once the client resolves the dots
        r = client.request(method, f"/v1/jobs/{job_id}{suffix}")
        assert r.status_code == 404, (method, suffix, r.text)
        assert r.headers["content-type"] == "application/json"
        assert "detail" in r.json()


# -- 4. cancellation ----------------------------------------------------------------------------
def test_cancel_queued_is_immediate(make_settings: Callable[..., Settings]) -> None:
    with app_client(make_settings, workers=1) as c:
        blocker = submit(c, steps=400, delay_s=0.02)
        wait_status(c, blocker, "running")
        queued = submit(c, steps=1, delay_s=0)
        assert get(c, queued)["status"] == "queued"
        r = c.delete(f"/v1/jobs/{queued}")
        assert r.status_code == 200
        job = r.json()
        assert job["status"] == "canceled" and job["finished_at"] is not None
        assert job["started_at"] is None and job["queue_position"] is None
        assert get(c, queued)["status"] == "canceled"
        c.delete(f"/v1/jobs/{blocker}")
        wait_status(c, blocker, "canceled")
        # The canceled job never ran.
        time.sleep(0.2)
        assert get(c, queued)["started_at"] is None
        assert c.get("/v1/files", params={"job_id": queued}).json()["files"] == []


def test_cancel_running_stops_at_next_step_and_leaves_no_file(
    make_settings: Callable[..., Settings], home: Path
) -> None:
    with app_client(make_settings) as c:
        h = c.app.state.kiapi  # type: ignore[attr-defined]
        job_id = c.portal.call(h.jobs.submit, "slowsave", {"steps": 400}).id  # type: ignore[union-attr]
        wait_progress(c, job_id)
        # The handler saved its file before the cancel: it is visible while it runs.
        assert len(c.get("/v1/files", params={"job_id": job_id}).json()["files"]) == 1
        assert len(list((home / "files" / "blobs").iterdir())) == 1
        r = c.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 202 and r.json()["status"] == "running"
        job = wait_status(c, job_id, *TERMINAL, timeout=5)
        assert job["status"] == "canceled"
        assert job["error"] == "canceled by request"
        assert job["artifacts"] == [] and job["result"] is None
        assert 0 < job["progress"] < 1
        assert c.get("/v1/files", params={"job_id": job_id}).json()["files"] == []
        assert list((home / "files" / "blobs").iterdir()) == []
        assert list((home / "files" / "tmp").iterdir()) == []

        # echo, canceled mid-steps, too.
        echo = submit(c, steps=400, delay_s=0.02)
        wait_progress(c, echo)
        assert c.delete(f"/v1/jobs/{echo}").status_code == 202
        assert wait_status(c, echo, *TERMINAL, timeout=5)["status"] == "canceled"
        assert c.get("/v1/files", params={"job_id": echo}).json()["files"] == []
        assert list((home / "files" / "blobs").iterdir()) == []


def test_cancel_finished_is_409(client: TestClient) -> None:
    done = client.post(
        ECHO, json={"text": "x", "steps": 1, "delay_s": 0}, headers={"Accept": "application/json"}
    ).json()
    r = client.delete(f"/v1/jobs/{done['id']}")
    assert r.status_code == 409
    body = r.json()
    assert body["status"] == "succeeded" and "succeeded" in body["detail"]
    failed = client.post(ECHO, json={"text": "x", "fail": True, "steps": 1, "delay_s": 0}).json()
    r = client.delete(f"/v1/jobs/{failed['job_id']}")
    assert r.status_code == 409 and r.json()["status"] == "failed"
    # And the job is untouched.
    assert get(client, done["id"])["status"] == "succeeded"


def test_sync_request_whose_job_is_canceled_is_409(make_settings: Callable[..., Settings]) -> None:
    with app_client(make_settings) as c:
        result: dict[str, httpx.Response] = {}
        t = threading.Thread(
            target=lambda: result.update(
                r=c.post(ECHO, json={"text": "x", "steps": 400, "delay_s": 0.02})
            )
        )
        t.start()
        job = wait_for(lambda: c.get("/v1/jobs", params={"status": "running"}).json()["jobs"])
        c.delete(f"/v1/jobs/{job[0]['id']}")
        t.join(10)
        r = result["r"]
        assert r.status_code == 409
        assert r.json()["job_id"] == job[0]["id"]
        assert r.json()["job_status"] == "canceled"


# -- 2. the job helper --------------------------------------------------------------------------
def test_sync_raw_artifact(client: TestClient) -> None:
    r = client.post(ECHO, json={"text": "raw bytes", "steps": 2, "delay_s": 0})
    assert r.status_code == 200
    assert r.content == b"raw bytes"
    assert r.headers["content-type"].startswith("text/plain")
    file_id, job_id = r.headers["x-kiapi-file-id"], r.headers["x-kiapi-job-id"]
    assert FILE_ID.fullmatch(file_id) and JOB_ID.fullmatch(job_id)
    job = get(client, job_id)
    assert job["status"] == "succeeded" and job["artifacts"] == [file_id]
    assert client.get(f"/v1/files/{file_id}").json()["job_id"] == job_id
    assert client.get(f"/v1/files/{file_id}/download").content == b"raw bytes"


def test_sync_raw_artifact_with_a_non_ascii_name(make_settings: Callable[..., Settings]) -> None:
    with app_client(make_settings) as c:
        r = c.post("/v1/test/named/run")
        assert r.status_code == 200, r.text
        assert r.content == "données".encode()
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        cd = r.headers["content-disposition"]
        assert cd.startswith('inline; filename="r_sum_ 2024.txt"')
        assert "filename*=utf-8''r%C3%A9sum%C3%A9%202024.txt" in cd


def test_sync_json(client: TestClient, doc: dict[str, Any]) -> None:
    r = client.post(
        ECHO,
        json={"text": "as json", "steps": 2, "delay_s": 0},
        headers={"Accept": "application/json"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    job = r.json()
    validate_job(doc, job)
    schema_validator(doc, "EchoJob").validate(job)
    assert job["status"] == "succeeded" and job["result"]["text"] == "as json"
    assert job == get(client, job["id"])


def test_sync_timeout_is_504_and_the_job_keeps_running(
    make_settings: Callable[..., Settings],
) -> None:
    with app_client(make_settings, sync_timeout_s=0.3) as c:
        started = time.monotonic()
        r = c.post(ECHO, json={"text": "slow", "steps": 10, "delay_s": 0.1})
        assert time.monotonic() - started < 10
        assert r.status_code == 504
        body = r.json()
        job_id = body["job_id"]
        assert JOB_ID.fullmatch(job_id) and job_id in body["detail"]
        assert "KIAPI_SYNC_TIMEOUT_S" in body["detail"]
        assert get(c, job_id)["status"] in ("queued", "running")
        done = wait_status(c, job_id, *TERMINAL)
        assert done["status"] == "succeeded" and done["result"]["text"] == "slow"
        assert c.get(f"/v1/files/{done['artifacts'][0]}/download").content == b"slow"


def test_queue_full_is_429_with_retry_after(make_settings: Callable[..., Settings]) -> None:
    with app_client(make_settings, workers=1, max_queue=2) as c:
        blocker = submit(c, steps=400, delay_s=0.02)
        wait_status(c, blocker, "running")
        waiting = [submit(c, steps=1, delay_s=0) for _ in range(2)]
        for mode in ("async", "sync"):
            r = c.post(ECHO, json={"text": "x", "mode": mode})
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert "KIAPI_MAX_QUEUE=2" in r.json()["detail"]
        # Refused submissions leave no trace.
        assert len(c.get("/v1/jobs").json()["jobs"]) == 3
        assert c.get("/health").json()["queue"] == {"waiting": 2, "running": 1}
        c.delete(f"/v1/jobs/{waiting[0]}")
        assert submit(c, steps=1, delay_s=0)  # a slot freed up


def test_retention_deletes_finished_jobs_and_keeps_their_files(
    make_settings: Callable[..., Settings],
) -> None:
    with app_client(make_settings, jobs_ttl_s=0.5, sweep_interval_s=0.2) as c:
        job_id = submit(c)
        done = wait_status(c, job_id, "succeeded")
        file_id = done["result"]["file_id"]
        get(c, job_id)  # read once, so a cached answer would be there to serve
        wait_for(lambda: c.get(f"/v1/jobs/{job_id}").status_code == 404, timeout=15)
        assert job_id not in {j["id"] for j in c.get("/v1/jobs").json()["jobs"]}
        assert c.get(f"/v1/jobs/{job_id}/events").status_code == 404
        # Files have their own retention (KIAPI_FILES_TTL_S, here none).
        assert c.get(f"/v1/files/{file_id}/download").content == b"hello"
        # A job still to run is no finished job: it waits out the sweeps.
        waiting = submit(c, steps=20, delay_s=0.1)
        time.sleep(1)
        assert get(c, waiting)["status"] in {"queued", "running"}


def test_handler_exception_fails_the_job_cleanly(client: TestClient) -> None:
    r = client.post(ECHO, json={"text": "x", "fail": True, "steps": 4, "delay_s": 0})
    assert r.status_code == 500
    body = r.json()
    assert body["detail"] == "RuntimeError: echo was asked to fail"
    assert body["job_status"] == "failed"
    assert "Traceback" not in r.text and 'File "' not in r.text
    job = get(client, body["job_id"])
    assert job["status"] == "failed" and job["error"] == "RuntimeError: echo was asked to fail"
    assert job["result"] is None and job["artifacts"] == []
    assert job["progress_label"] == "failed"
    assert client.get("/v1/files", params={"job_id": job["id"]}).json()["files"] == []
    # Async: same end state, polled.
    job_id = submit(client, fail=True, steps=2, delay_s=0)
    job = wait_status(client, job_id, *TERMINAL)
    assert job["status"] == "failed" and "echo was asked to fail" in job["error"]
    assert "Traceback" not in json.dumps(job)


def test_handler_calling_sys_exit_does_not_kill_the_worker(
    make_settings: Callable[..., Settings],
) -> None:
    with app_client(make_settings, workers=1) as c:
        h = c.app.state.kiapi  # type: ignore[attr-defined]
        job_id = c.portal.call(h.jobs.submit, "exits", {}).id  # type: ignore[union-attr]
        job = wait_status(c, job_id, *TERMINAL, timeout=5)
        assert job["status"] == "failed" and job["error"] == "SystemExit: 3"
        # The only worker thread survived and takes the next job.
        r = c.post(ECHO, json={"text": "still here", "steps": 1, "delay_s": 0})
        assert r.status_code == 200 and r.content == b"still here"


# -- 3. the worker thread keeps the control plane free ------------------------------------------
def _timed(c: TestClient, path: str) -> tuple[httpx.Response, float]:
    t = time.monotonic()
    r = c.get(path)
    return r, time.monotonic() - t


def test_control_plane_answers_while_a_job_runs(make_settings: Callable[..., Settings]) -> None:
    with app_client(make_settings) as c:
        up = c.post("/v1/files", files={"file": ("blob.bin", b"x" * 200_000)}).json()
        paths = ["/health", "/openapi.json", f"/v1/files/{up['id']}/download", "/v1/jobs"]
        idle = {p: _timed(c, p)[1] for p in paths}

        # A sync request waits on the event loop while the job runs on a worker thread.
        sync: dict[str, httpx.Response] = {}
        t = threading.Thread(
            target=lambda: sync.update(
                r=c.post(
                    ECHO,
                    json={"text": "long", "steps": 400, "delay_s": 0.02},
                    headers={"Accept": "application/json"},
                )
            )
        )
        t.start()
        job_id = wait_for(lambda: c.get("/v1/jobs", params={"status": "running"}).json()["jobs"])
        job_id = job_id[0]["id"]
        busy: dict[str, float] = {}
        for _ in range(3):
            for p in [*paths, f"/v1/jobs/{job_id}"]:
                r, took = _timed(c, p)
                assert r.status_code == 200, p
                busy[p] = max(busy.get(p, 0.0), took)
        assert get(c, job_id)["status"] == "running"  # all of the above overlapped the job
        for p, took in busy.items():
            assert took < PROMPT_S + 10 * idle.get(p, 0.0), (p, took, idle.get(p))
        c.delete(f"/v1/jobs/{job_id}")
        t.join(10)
        assert sync["r"].status_code == 409


# -- 1. SSE against a live server ---------------------------------------------------------------
def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    event: str | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if event is not None and data:
                yield event, json.loads("\n".join(data))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def test_events_stream_live(live_server: Callable[..., Any]) -> None:
    """`curl -N .../events` against a real server: one event per change, closed at the end."""
    server = live_server({"KIAPI_PLUGINS": "echo", "KIAPI_WORKERS": "1"})
    steps = 5
    with server.client() as c, server.client() as control:
        blocker = submit(c, steps=400, delay_s=0.02)
        wait_status(c, blocker, "running")
        ahead = submit(c, steps=1, delay_s=0)
        # Quick steps: a follower that re-read the store on wake-ups would merge some of them.
        job_id = submit(c, steps=steps, delay_s=0.05)
        events: list[tuple[str, dict[str, Any]]] = []
        started = time.monotonic()
        with c.stream(
            "GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-cache"
            for event in _sse_events(r.iter_lines()):
                events.append(event)
                job = event[1]
                # Move the queue along only once the stream is live, so it sees every change.
                if job["status"] == "queued" and job["queue_position"] == 2:
                    control.delete(f"/v1/jobs/{ahead}")
                elif job["status"] == "queued" and job["queue_position"] == 1:
                    control.delete(f"/v1/jobs/{blocker}")
        # The server closed the stream itself, right after the terminal event.
        assert time.monotonic() - started < 30
    kinds = [k for k, _ in events]
    assert kinds == ["progress"] * (len(events) - 1) + ["end"]
    jobs = [j for _, j in events]
    assert all(j["id"] == job_id and set(j) == JOB_FIELDS for j in jobs)
    assert [(j["status"], j["queue_position"], j["progress_label"]) for j in jobs] == [
        ("queued", 2, "queued"),
        ("queued", 1, "queued"),
        ("running", None, "running"),
        ("running", None, "loading"),
        *[("running", None, f"step {n}/{steps}") for n in range(1, steps + 1)],
        ("running", None, "saving"),
        ("succeeded", None, "done"),
    ]
    progress = [j["progress"] for j in jobs]
    assert progress[:3] == [None, None, None]
    assert progress[3:] == sorted(progress[3:]) and progress[-1] == 1.0
    assert 0 < progress[-2] < 1  # not done until it is saved
    assert jobs[-1]["result"]["text"] == "hello" and jobs[-1]["artifacts"]

    # A finished job's stream is just its end event.
    with server.client() as c, c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        again = list(_sse_events(r.iter_lines()))
    assert [k for k, _ in again] == ["end"] and again[0][1] == jobs[-1]


def test_sync_client_disconnect_does_not_cancel_live(
    live_server: Callable[..., Any],
) -> None:
    server = live_server({"KIAPI_PLUGINS": "echo"})
    with server.client() as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post(ECHO, json={"text": "left behind", "steps": 8, "delay_s": 0.15}, timeout=0.5)
        jobs = c.get("/v1/jobs").json()["jobs"]
        assert len(jobs) == 1 and jobs[0]["status"] in ("queued", "running")
        done = wait_status(c, jobs[0]["id"], *TERMINAL)
        assert done["status"] == "succeeded" and done["result"]["text"] == "left behind"
        assert c.get(f"/v1/files/{done['artifacts'][0]}/download").content == b"left behind"


# -- 7. the seam --------------------------------------------------------------------------------
def _members(proto: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(proto).items()
        if callable(member) and not name.startswith("_")
    }


@pytest.mark.parametrize(("proto", "impl"), [(JobStore, SqliteJobStore), (Dispatcher, WorkerPool)])
def test_protocols_are_satisfied_structurally(proto: type, impl: type) -> None:
    wanted = _members(proto)
    assert wanted, proto
    for name, signature in wanted.items():
        assert hasattr(impl, name), f"{impl.__name__} lacks {name}"
        got = inspect.signature(getattr(impl, name))
        assert list(got.parameters) == list(signature.parameters), name
        for pname, param in signature.parameters.items():
            assert got.parameters[pname].kind == param.kind, (name, pname)
            assert got.parameters[pname].default == param.default, (name, pname)
        assert got.return_annotation == signature.return_annotation, name
    assert isinstance(object.__new__(impl), proto)


class ListDispatcher:
    """A stand-in backend: records dispatched jobs; the test plays the remote worker."""

    def __init__(self) -> None:
        self.started = False
        self.dispatched: list[str] = []

    def start(self) -> None:
        self.started = True

    def stop(self, timeout: float = 5.0) -> None:
        self.started = False

    def dispatch(self, job: JobRecord) -> None:
        self.dispatched.append(job.id)

    def describe(self) -> dict[str, Any]:
        return {"mode": "test"}


def test_job_service_over_the_seam(tmp_path: Path) -> None:
    import asyncio

    db = Database(tmp_path / "kiapi.db")
    files = FileStore(tmp_path / "files", db)
    store: JobStore = SqliteJobStore(db)
    dispatcher: Dispatcher = ListDispatcher()
    events = JobEvents()
    service = JobService(store, dispatcher, events, files, max_queue=2, workers=1, keepalive_s=0.2)

    run = asyncio.run
    a = run(service.submit("echo", {"text": "a"}))
    b = run(service.submit("echo", {"text": "b"}))
    assert JOB_ID.fullmatch(a.id) and a.status == "queued" and a.queue_position == 1
    assert dispatcher.dispatched == [a.id, b.id]  # type: ignore[attr-defined]
    with pytest.raises(QueueFull):
        run(service.submit("echo", {"text": "c"}))
    assert run(service.retry_after_s("echo")) >= 1

    # A remote worker takes a and finishes it through the same store.
    claimed = store.claim_next("remote-1", frozenset({"echo"}))
    assert claimed is not None and claimed.id == a.id and claimed.status == "running"
    store.set_progress(a.id, 0.5, "half")
    assert (run(service.get(a.id)) or claimed).progress == 0.5
    assert store.finish(a.id, "succeeded", worker="remote-1", result={"ok": True})
    assert not store.finish(a.id, "failed", worker="remote-1")  # already terminal
    assert run(service.get(b.id)).queue_position == 1  # type: ignore[union-attr]

    async def scenario() -> None:
        events.bind(asyncio.get_running_loop())
        done = await service.wait_terminal(a.id, 1.0)
        assert done is not None and done.status == "succeeded" and done.result == {"ok": True}
        # b never finishes here: the wait gives up with its latest state.
        t = time.monotonic()
        waiting = await service.wait_terminal(b.id, 0.2)
        assert waiting is not None and waiting.status == "queued"
        assert time.monotonic() - t < 5

        # A stream sees a change made by another party (no wake-up: the hub's slow poll).
        def kinds(chunk: bytes) -> list[str]:
            return re.findall(r"^event: (\w+)$", chunk.decode(), re.M)

        queued = await service.get(b.id)
        assert queued is not None
        # Nothing changes for a while: keep-alive comments, no repeated events.
        stream = await open_job_stream(service, queued, None)
        ticks: list[bytes] = []
        async with aclosing(stream.chunks()) as chunks:
            async for chunk in chunks:
                ticks.append(chunk)
                if len(ticks) == 4:
                    break
        assert kinds(ticks[0]) == ["progress"] and ticks[1:] == [KEEPALIVE_ITEM.data] * 3
        assert service.hub.follower_count == 0

        seen: list[str] = []

        async def follow() -> None:
            stream = await open_job_stream(service, queued, None)
            async for chunk in stream.chunks():
                seen.extend(kinds(chunk))

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.1)
        assert store.cancel(b.id) is not None  # straight to the store: nobody publishes
        await asyncio.wait_for(task, 5)
        assert seen == ["progress", "end"]

    asyncio.run(scenario())

    # Recovery through the seam: a job left running by a dead process fails, its file goes.
    c = run(service.submit("echo", {"text": "c"}))
    assert store.claim_next("dead-worker") is not None
    saved = files.put_bytes(b"half", filename="x", content_type="text/plain", job_id=c.id)
    assert service.recover() == [c.id]
    lost = run(service.get(c.id))
    assert lost is not None and lost.status == "failed"
    assert lost.error == "interrupted by server restart"
    assert files.get(saved.id) is None
    db.close()


def test_database_from_before_the_version_column_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL, status TEXT NOT NULL, params TEXT NOT NULL, result TEXT,
            artifacts TEXT NOT NULL DEFAULT '[]', error TEXT, created_at REAL NOT NULL,
            started_at REAL, finished_at REAL, progress REAL,
            progress_label TEXT NOT NULL DEFAULT 'queued',
            cancel_requested INTEGER NOT NULL DEFAULT 0, error_kind TEXT, worker TEXT);
        INSERT INTO jobs (id, type, status, params, created_at)
            VALUES ('job_00000000000000aa', 'echo', 'queued', '{}', 1.0);
    """)
    old.commit()
    old.close()
    db = Database(path)
    store = SqliteJobStore(db)
    job = store.get("job_00000000000000aa")
    assert job is not None and job.version == 0 and job.queue_position == 1
    claimed = store.claim_next("w")
    assert claimed is not None and claimed.version == 1
    assert (store.get(claimed.id) or job).version == 1
    db.close()


# -- 2. what is not strict JSON never reaches an answer (issue 13) -----------------------------
def _strict(text: str) -> Any:
    """Parse as a browser would: NaN and Infinity are not JSON."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in a JSON answer")

    return json.loads(text, parse_constant=refuse)


def test_handler_output_that_is_not_strict_json_fails_its_job(
    live_server: Callable[..., Any],
) -> None:
    server = live_server({"KIAPI_PLUGINS": "echo"})
    json_only = {"Accept": "application/json"}
    with server.client() as c:
        r = c.post(ECHO, json={"text": "nan", "misbehave": "nan_result"}, headers=json_only)
        assert r.status_code == 500 and "not strict JSON" in _strict(r.text)["detail"], r.text
        bad_result = _strict(c.get(f"/v1/jobs/{r.json()['job_id']}").text)
        assert bad_result["status"] == "failed" and bad_result["result"] is None
        assert "result of the 'echo' handler is not strict JSON" in bad_result["error"]

        r = c.post(ECHO, json={"text": "nan", "misbehave": "nan_progress"}, headers=json_only)
        assert r.status_code == 500, r.text
        assert "progress fraction must be a finite number" in _strict(r.text)["detail"]

        r = c.post(ECHO, json={"text": "inf", "misbehave": "nan_detail"}, headers=json_only)
        assert r.status_code == 400 and "not strict JSON" in _strict(r.text)["detail"], r.text

        listing = c.get("/v1/jobs")
        assert listing.status_code == 200 and len(_strict(listing.text)["jobs"]) == 3
        # The worker is fine: the next job succeeds.
        assert c.post(ECHO, json={"text": "fine", "steps": 1}).text == "fine"


BAD_ROWS = {
    # id suffix: (type, status, params, result, extra column assignments)
    "00000000000000a1": ("echo", "succeeded", '{"text": Infinity}', None, ""),
    "00000000000000a2": ("echo", "succeeded", "{}", '{"score": NaN}', ""),
    "00000000000000a3": ("echo", "failed", "{broken", None, ""),
    "00000000000000a4": ("echo", "succeeded", "{}", None, ", progress = 9e999"),
    "00000000000000a5": ("echo", "failed", "{}", None, ", error = CAST(x'ff41' AS TEXT)"),
    "00000000000000a6": ("echo", "succeeded", '["not", "an object"]', '{"deep": 1e400}', ""),
    # Queued for a type no plugin serves: the worker claims it too, and fails it.
    "00000000000000b1": ("nobody", "queued", '{"weight": -Infinity}', None, ""),
    # Queued for echo: the worker claims it and must fail it, not loop on it.
    "00000000000000c1": ("echo", "queued", '{"text": NaN}', None, ""),
}


def _write_bad_rows(db: Path) -> None:
    import sqlite3

    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        for suffix, (job_type, status, params, result, extra) in BAD_ROWS.items():
            job_id = f"job_{suffix}"
            conn.execute(
                "INSERT INTO jobs (id, type, status, params, result, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, job_type, status, params, result, time.time()),
            )
            if extra:
                conn.execute(f"UPDATE jobs SET {extra.lstrip(', ')} WHERE id = ?", (job_id,))
    finally:
        conn.close()


def test_damaged_records_never_make_the_jobs_api_fail(live_server: Callable[..., Any]) -> None:
    """Rows written straight into kiapi.db that the store would never write: each read shows
    the job with an error naming the damage, and every listing shows all the others."""
    server = live_server({"KIAPI_PLUGINS": "echo"})
    with server.client() as c:
        good = [submit(c, text=f"good {i}", steps=1, delay_s=0) for i in range(2)]
        for job_id in good:
            wait_status(c, job_id, "succeeded")
        _write_bad_rows(server.home / "kiapi.db")
        bad = [f"job_{suffix}" for suffix in BAD_ROWS]

        # The queued echo row is claimed with the next job, and fails with its damage.
        after = submit(c, text="after", steps=1, delay_s=0)
        claimed = wait_status(c, "job_00000000000000c1", "failed")
        assert "stored record of this job is damaged" in claimed["error"], claimed
        assert wait_status(c, after, "succeeded")["result"]["text"] == "after"

        for query in ({}, {"status": "succeeded"}, {"type": "echo"}, {"limit": "3"}):
            r = c.get("/v1/jobs", params=query)
            assert r.status_code == 200, (query, r.text)
            _strict(r.text)
        listing = _strict(c.get("/v1/jobs", params={"limit": "100"}).text)["jobs"]
        shown = {j["id"]: j for j in listing}
        assert set(shown) == {*good, after, *bad}
        for job_id in good:
            assert shown[job_id]["error"] is None and shown[job_id]["result"]["text"]
        for job_id in bad:
            job = shown[job_id]
            # Text that is not UTF-8 shows with replacement characters: nothing else is wrong.
            assert "damaged" in job["error"] or job["error"] == "\ufffdA", job
            one = c.get(f"/v1/jobs/{job_id}")
            assert one.status_code == 200 and _strict(one.text)["id"] == job_id, one.text
        assert "params" in shown["job_00000000000000a1"]["error"]
        assert "result" in shown["job_00000000000000a2"]["error"]
        assert "progress" in shown["job_00000000000000a4"]["error"]

        # SSE: strict JSON, and the stream ends.
        with c.stream("GET", "/v1/jobs/job_00000000000000a2/events") as r:
            raw = [line for line in r.iter_lines() if line.startswith("data:")]
        assert len(raw) == 1 and _strict(raw[0][5:])["status"] == "succeeded"

        # A damaged job of a type nobody serves fails too (it never waits forever), and
        # canceling it then is a plain 409 in strict JSON.
        unserved = wait_status(c, "job_00000000000000b1", "failed")
        assert "stored record of this job is damaged" in unserved["error"], unserved
        refused = c.delete("/v1/jobs/job_00000000000000b1")
        assert refused.status_code == 409, refused.text
        assert _strict(refused.text)["status"] == "failed"

    for args in (["jobs", "list"], ["jobs", "list", "--json"]):
        done = run_cli(*args, "--url", server.url, "--limit", "100")
        assert done.returncode == 0, done.stderr
        assert all(job_id in done.stdout for job_id in bad), done.stdout


def test_job_reads_ahead_of_the_router_answer_as_the_route(
    live_server: Callable[..., Any],
) -> None:
    """GET /v1/jobs/{id} is served by jobs/hot_read.py: the same bytes and headers as the
    route's JSONResponse, never a stale cached encoding, and auth still in front of it."""
    server = live_server({"KIAPI_PLUGINS": "echo", "KIAPI_API_KEY": "k" * 32})
    auth = {"Authorization": "Bearer " + "k" * 32}
    with httpx.Client(base_url=server.url, headers=auth, timeout=10) as c:
        job_id = submit(c, text="caf\u00e9", steps=2, delay_s=0, fail=True)
        wait_status(c, job_id, "failed")
        for _ in range(2):  # the second read is the cached encoding's
            r = c.get(f"/v1/jobs/{job_id}")
            listed = next(j for j in c.get("/v1/jobs").json()["jobs"] if j["id"] == job_id)
            assert r.status_code == 200
            assert (
                r.content == json.dumps(listed, ensure_ascii=False, separators=(",", ":")).encode()
            )
            assert r.headers["content-type"] == "application/json"
            assert int(r.headers["content-length"]) == len(r.content)
        assert c.head(f"/v1/jobs/{job_id}").status_code == 200
        assert c.get(f"/v1/jobs/{job_id}?x=1").content == r.content

        # A row written behind the store's back (no version bump) shows at the next read.
        conn = sqlite3.connect(server.home / "kiapi.db")
        try:
            conn.execute(
                "UPDATE jobs SET progress_label = 'edited by hand' WHERE id = ?", (job_id,)
            )
            conn.commit()
        finally:
            conn.close()
        assert get(c, job_id)["progress_label"] == "edited by hand"
        retry = c.post(f"/v1/jobs/{job_id}/retry")
        assert retry.status_code == 202, retry.text
        assert get(c, job_id)["retried_by"] == retry.json()["id"]

        missing = c.get("/v1/jobs/job_0123456789abcdef")
        assert missing.status_code == 404 and "no job" in missing.json()["detail"]
        refused = httpx.get(f"{server.url}/v1/jobs/{job_id}")
        assert refused.status_code == 401, refused.text
