"""Faults on a live server: a crash mid-generation, a failing disk, failing and hanging
handlers, a client that goes away. kiapi loses no job, leaves no partial or orphaned file, and
keeps serving.

The crash test runs the real ideogram4 pipeline on the tiny random-weight checkpoint: the server
is killed with SIGKILL while it decodes an image, restarted on the same KIAPI_HOME, and the
generation queued behind the killed one then runs to the end (one full generation).
"""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from reliability import (
    ECHO,
    GENERATE,
    OFFLINE,
    TERMINAL,
    assert_healthy,
    ideogram4_home,
    job,
    unfinished,
    wait_terminal,
)

from kiapi_core.testing import LiveServer, start_server, wait_for

I4_ENV = {**OFFLINE, "KIAPI_PLUGINS": "echo,ideogram4", "KIAPI_WORKERS": "1"}
SMALL = {"width": 256, "height": 256, "preset": "V4_TURBO_12"}
PNG = b"\x89PNG\r\n\x1a\n"


def files_on_disk(home: Path) -> tuple[set[str], set[str], list[Path]]:
    """(ids recorded in the database, blob names on disk, temp files)."""
    conn = sqlite3.connect(home / "kiapi.db")
    try:
        recorded = {row[0] for row in conn.execute("SELECT id FROM files")}
    finally:
        conn.close()
    blobs = {p.name for p in (home / "files" / "blobs").iterdir()}
    return recorded, blobs, list((home / "files" / "tmp").iterdir())


def assert_no_orphans(home: Path) -> None:
    recorded, blobs, temps = files_on_disk(home)
    assert recorded == blobs, f"records without blobs or blobs without records: {recorded ^ blobs}"
    assert temps == [], temps


def submit(c: httpx.Client, path: str, body: dict[str, Any]) -> str:
    r = c.post(path, json={**body, "mode": "async"})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    return job_id


# -- SIGKILL mid-generation ------------------------------------------------------------------


def test_sigkill_mid_generation_then_restart(tmp_path: Path) -> None:
    home = ideogram4_home(tmp_path)
    server = start_server(home, I4_ENV)
    try:
        with server.client() as c:
            done = c.post(
                ECHO, json={"text": "before the crash"}, headers={"Accept": "application/json"}
            )
            assert done.status_code == 200 and done.json()["status"] == "succeeded"
            kept = done.json()
            doomed = submit(
                c, GENERATE, {"prompt": "a red poster that says HELLO", "seed": 1, **SMALL}
            )
            queued_image = submit(
                c, GENERATE, {"prompt": "a blue sign that says BYE", "seed": 2, **SMALL}
            )
            queued_echo = submit(c, ECHO, {"text": "after the crash", "steps": 2})
            # Mid-generation: the model is loaded, the steps are done, the VAE is decoding.
            seen: list[str] = []

            def decoding() -> bool:
                state = job(c, doomed)
                seen.append(f"{state['status']}:{state['progress_label']}")
                assert state["status"] in ("queued", "running"), seen[-5:]
                return bool(state["progress_label"] == "decoding")

            wait_for(decoding, timeout=180, interval=0.05)
            assert [job(c, j)["status"] for j in (queued_image, queued_echo)] == ["queued"] * 2
        server.kill()
        assert server.proc.returncode == -signal.SIGKILL
    finally:
        server.stop()

    restarted = start_server(home, I4_ENV)
    try:
        with restarted.client() as c:
            # The interrupted generation failed, clearly, and left nothing behind.
            failed = wait_terminal(c, doomed, timeout=30)
            assert failed["status"] == "failed", failed
            assert "interrupted by server restart" in failed["error"]
            assert failed["artifacts"] == [] and failed["result"] is None
            assert c.get("/v1/files", params={"job_id": doomed}).json()["files"] == []
            # What was queued still runs: the echo, then a whole generation.
            echoed = wait_terminal(c, queued_echo, timeout=120)
            image = wait_terminal(c, queued_image, timeout=300)
            assert echoed["status"] == "succeeded", echoed
            assert image["status"] == "succeeded", image
            assert image["result"]["width"] == 256 and image["result"]["params"]["seed"] == 2
            png = c.get(f"/v1/files/{image['result']['file_id']}/download")
            assert png.status_code == 200 and png.content.startswith(PNG)
            # What had finished before the crash is intact, bytes included.
            assert job(c, kept["id"]) == kept
            text = c.get(f"/v1/files/{kept['artifacts'][0]}/download")
            assert text.content == b"before the crash"
            # No job lost or stuck.
            assert unfinished(c) == []
            listed = {j["id"]: j["status"] for j in c.get("/v1/jobs").json()["jobs"]}
            assert set(listed) == {kept["id"], doomed, queued_image, queued_echo}
            assert set(listed.values()) <= TERMINAL
        assert_healthy(restarted)
        assert_no_orphans(home)
    finally:
        restarted.stop()


# -- disk, handlers, clients -----------------------------------------------------------------


@pytest.fixture
def echo_server(tmp_path: Path) -> Iterator[LiveServer]:
    server = start_server(
        tmp_path / "home",
        {"KIAPI_PLUGINS": "echo", "KIAPI_WORKERS": "1", "KIAPI_JOB_TIMEOUT_S": "1"},
    )
    try:
        yield server
    finally:
        server.stop()


def break_dir(path: Path) -> Callable[[], None]:
    """Make ``path`` unusable as a directory, even for root (a file takes its place)."""
    away = path.with_name(path.name + ".away")
    path.rename(away)
    path.write_bytes(b"not a directory")

    def restore() -> None:
        path.unlink()
        away.rename(path)

    return restore


@pytest.mark.parametrize("broken", ["tmp", "blobs"])
def test_write_error_while_saving_an_artifact(echo_server: LiveServer, broken: str) -> None:
    home = echo_server.home
    restore = break_dir(home / "files" / broken)
    try:
        with echo_server.client() as c:
            r = c.post(ECHO, json={"text": "cannot be saved"})
            assert r.status_code == 500, r.text
            body = r.json()
            assert body["job_status"] == "failed"
            detail = body["detail"]
            assert "could not store" in detail and "echo.txt" in detail, detail
            failed = job(c, body["job_id"])
            assert failed["status"] == "failed" and failed["artifacts"] == []
            # An upload meets the same disk: a clear, documented answer, not a bare 500.
            up = c.post("/v1/files", files={"file": ("up.bin", b"data")})
            assert up.status_code == 503, up.text
            assert "could not store" in up.json()["detail"]
            assert_healthy(echo_server)
    finally:
        restore()
    with echo_server.client() as c:
        ok = c.post(ECHO, json={"text": "saved again"})
        assert ok.status_code == 200 and ok.text == "saved again"
        assert c.post("/v1/files", files={"file": ("up.bin", b"data")}).status_code == 201
    assert_no_orphans(home)
    assert "unhandled error" not in echo_server.output()


def test_a_handler_that_raises_frees_its_worker(echo_server: LiveServer) -> None:
    with echo_server.client() as c:
        r = c.post(ECHO, json={"text": "boom", "fail": True, "steps": 2})
        assert r.status_code == 500
        assert r.json()["detail"] == "RuntimeError: echo was asked to fail"
        after = c.post(ECHO, json={"text": "next"})
        assert after.status_code == 200 and after.text == "next"
    assert_no_orphans(echo_server.home)


def test_a_handler_that_hangs_past_its_limit_frees_its_worker(echo_server: LiveServer) -> None:
    with echo_server.client() as c:
        # Cooperative: it reports progress, so it stops at its next report past the limit.
        slow = submit(c, ECHO, {"text": "slow", "steps": 1000, "delay_s": 0.05})
        # Hung: one step sleeps far past the limit without a word; the watchdog gives up on
        # it and hands its slot to a fresh worker thread.
        hung = submit(c, ECHO, {"text": "hung", "steps": 2, "delay_s": 10})
        after = submit(c, ECHO, {"text": "after", "steps": 1})
        for job_id in (slow, hung):
            ended = wait_terminal(c, job_id, timeout=60)
            assert ended["status"] == "failed", ended
            assert "KIAPI_JOB_TIMEOUT_S=1" in ended["error"], ended["error"]
            assert ended["artifacts"] == []
        assert "abandoned" in job(c, hung)["error"]
        assert wait_terminal(c, after, timeout=60)["status"] == "succeeded"
    log = echo_server.output()
    assert f"job {hung} hung past its limit; replacing worker" in log
    assert_healthy(echo_server)
    assert_no_orphans(echo_server.home)


def test_client_disconnect_mid_sync_wait(echo_server: LiveServer) -> None:
    with echo_server.client() as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post(ECHO, json={"text": "nobody waits", "steps": 10, "delay_s": 0.05}, timeout=0.2)
        # The connection is gone; the job is not.
        listed = c.get("/v1/jobs", params={"type": "echo"}).json()["jobs"]
        assert len(listed) == 1
        done = wait_terminal(c, listed[0]["id"], timeout=30)
        assert done["status"] == "succeeded", done
        data = c.get(f"/v1/files/{done['artifacts'][0]}/download")
        assert data.content == b"nobody waits"
    assert_healthy(echo_server)
