"""What a handler gets from its JobContext, and plugins registered in code run where
production runs them: in the worker process."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import documented
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from kiapi_core import Capability, hookimpl
from kiapi_core.app import create_app
from kiapi_core.jobs.context import JobContext
from kiapi_core.jobs.respond import respond_with_job
from kiapi_core.settings import Settings
from kiapi_core.testing import wait_for


async def _run_ctx(request: Request) -> Response:
    body = await request.json()
    return await respond_with_job(
        request, job_type="ctxtest", params=body, mode=body.get("mode", "sync")
    )


_CTX_ROUTE = Route("/v1/test/ctx/run", _run_ctx, methods=["POST"])


class Helpers:
    """A plugin whose handler uses the context the way real ones do: its data directory, an
    input file, and progress from a helper thread."""

    @hookimpl
    def register_job_handlers(self, register: Callable[[str, Any], None]) -> None:
        register("ctxtest", self.run)

    @hookimpl
    def register_capabilities(self, register: Callable[[Capability], None]) -> None:
        register(Capability(name="ctx", domain="test"))

    @hookimpl
    def register_routes(self) -> list[Route]:
        return [_CTX_ROUTE]

    @hookimpl
    def register_openapi(self) -> dict[str, Any]:
        return documented(_CTX_ROUTE)

    @staticmethod
    def run(ctx: JobContext) -> dict[str, Any]:
        seen = ctx.data_dir / "seen.txt"
        count = int(seen.read_text()) + 1 if seen.exists() else 1
        seen.write_text(str(count))
        out: dict[str, Any] = {"data_dir": str(ctx.data_dir), "count": count, "pid": os.getpid()}
        if "file_id" in ctx.params:
            with ctx.open_file(ctx.params["file_id"]) as fh:
                out["file"] = fh.read().decode()
            out["filename"] = ctx.file_info(ctx.params["file_id"]).filename
        if ctx.params.get("ticker"):
            stopped = threading.Event()
            answers: list[bool] = []

            def tick() -> None:
                # A helper thread: reports never raise here, and say when to stop.
                for i in range(400):
                    answers.append(ctx.report_progress(0.5 + i / 1000, None))
                    if not answers[-1]:
                        break
                    time.sleep(0.01)
                stopped.set()

            ctx.progress(0.5, "ticking")
            threading.Thread(target=tick, daemon=True).start()
            stopped.wait(30)
            out["ticker_stopped_early"] = answers[-1] is False
            ctx.progress(0.1, "after the ticker")  # raises if canceled; never moves back
        return out


@pytest.fixture
def app_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    app = create_app(make_settings(), extra_plugins=[("helpers", Helpers())])
    with TestClient(app) as c:
        yield c


def test_a_plugin_registered_in_code_runs_its_jobs_in_the_worker_process(
    app_client: TestClient,
) -> None:
    assert app_client.get("/health").json()["worker"]["mode"] == "process"
    r = app_client.post("/v1/test/ctx/run", json={}, headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["result"]["pid"] != os.getpid()


def test_a_plugin_that_cannot_be_named_runs_on_threads_and_says_so(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    class Local(Helpers):  # defined in a function: the worker process cannot import it
        pass

    with caplog.at_level(logging.WARNING, logger="kiapi"):
        app = create_app(make_settings(), extra_plugins=[("local", Local())])
    assert "defined inside a function" in caplog.text
    with TestClient(app) as c:
        assert c.get("/health").json()["worker"]["mode"] == "thread"
        r = c.post("/v1/test/ctx/run", json={}, headers={"Accept": "application/json"})
        assert r.json()["result"]["pid"] == os.getpid()


def test_the_data_dir_is_the_plugins_own_under_the_home(app_client: TestClient, home: Path) -> None:
    runs = [
        app_client.post("/v1/test/ctx/run", json={}, headers={"Accept": "application/json"})
        for _ in range(2)
    ]
    results = [r.json()["result"] for r in runs]
    assert results[0]["data_dir"] == str(home / "plugins" / "helpers")
    assert [r["count"] for r in results] == [1, 2]  # kept across jobs
    assert (home / "plugins" / "helpers").stat().st_mode & 0o777 == 0o700


def test_a_handler_reads_an_input_file_by_id(app_client: TestClient) -> None:
    up = app_client.post("/v1/files", files={"file": ("in.txt", b"input bytes", "text/plain")})
    assert up.status_code == 201
    r = app_client.post(
        "/v1/test/ctx/run",
        json={"file_id": up.json()["id"]},
        headers={"Accept": "application/json"},
    )
    assert r.json()["result"]["file"] == "input bytes"
    assert r.json()["result"]["filename"] == "in.txt"
    missing = app_client.post("/v1/test/ctx/run", json={"file_id": "file_0123456789abcdef"})
    assert missing.status_code == 400
    assert "upload it first" in missing.json()["detail"]


def test_helper_threads_report_progress_and_learn_of_a_cancel(app_client: TestClient) -> None:
    r = app_client.post("/v1/test/ctx/run", json={"ticker": True, "mode": "async"})
    job_id = r.json()["job_id"]
    seen: list[float] = []

    def ticking() -> bool:
        job = app_client.get(f"/v1/jobs/{job_id}").json()
        if job["progress"] is not None:
            seen.append(job["progress"])
        return bool(job["progress"] and job["progress"] > 0.55)

    wait_for(ticking, timeout=30)
    assert app_client.delete(f"/v1/jobs/{job_id}").status_code == 202
    job = wait_for(
        lambda: (j := app_client.get(f"/v1/jobs/{job_id}").json())["status"] == "canceled" and j,
        timeout=30,
    )
    assert job["status"] == "canceled"
    assert seen == sorted(seen)  # never backwards, whichever thread reported
