"""Durability: a real server killed with SIGKILL mid-job, restarted on the same KIAPI_HOME.

The chosen behaviour (DESIGN §4, documented in kiapi_core/jobs/store.py): finished jobs and
their files survive; queued jobs stay queued and run after the restart; a job that was running
is *not* re-queued but ends ``failed`` with the error ``interrupted by server restart``, and any
file it had already saved is deleted.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from kiapi_core.files.store import FileStore
from kiapi_core.state.sqlite import Database
from kiapi_core.testing import wait_for

ECHO = "/v1/text/echo/run"
ENV = {"KIAPI_PLUGINS": "echo", "KIAPI_WORKERS": "1"}
TERMINAL = {"succeeded", "failed", "canceled"}


def terminal(c: Any, job_id: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job: dict[str, Any] = c.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in TERMINAL else None

    job: dict[str, Any] = wait_for(check)
    return job


def test_sigkill_mid_job_then_restart(live_server: Callable[..., Any]) -> None:
    server = live_server(ENV)
    home = server.home
    with server.client() as c:
        # Finished before the crash: a job with its artifact, and an upload.
        done = c.post(
            ECHO,
            json={"text": "survives", "steps": 1, "delay_s": 0},
            headers={"Accept": "application/json"},
        ).json()
        assert done["status"] == "succeeded"
        uploaded = c.post("/v1/files", files={"file": ("kept.bin", b"\x00kept\xff")}).json()

        # Running at the crash: many slow steps. Queued behind it: two quick jobs.
        running = c.post(
            ECHO, json={"text": "doomed", "steps": 500, "delay_s": 0.05, "mode": "async"}
        ).json()["job_id"]
        wait_for(lambda: (c.get(f"/v1/jobs/{running}").json()["progress"] or 0) > 0)
        queued = [
            c.post(
                ECHO, json={"text": f"queued {i}", "steps": 2, "delay_s": 0, "mode": "async"}
            ).json()["job_id"]
            for i in range(2)
        ]
        assert [c.get(f"/v1/jobs/{q}").json()["queue_position"] for q in queued] == [1, 2]

    server.kill()
    assert server.proc.returncode == -signal.SIGKILL

    # What a handler of the running job might have saved before the crash (echo saves only
    # at its end, so put one there by hand): the restart must remove it too.
    db = Database(home / "kiapi.db")
    partial = FileStore(home / "files", db).put_bytes(
        b"half an output", filename="partial.txt", content_type="text/plain", job_id=running
    )
    db.close()
    # And a write the crash cut short.
    (home / "files" / "tmp" / "tmpcut.part").write_bytes(b"cut short")

    restarted = live_server(ENV, home=home)
    with restarted.client() as c:
        # Finished jobs and their files are all still there.
        assert c.get(f"/v1/jobs/{done['id']}").json() == done
        file_id = done["artifacts"][0]
        assert c.get(f"/v1/files/{file_id}").json()["job_id"] == done["id"]
        assert c.get(f"/v1/files/{file_id}/download").content == b"survives"
        got = c.get(f"/v1/files/{uploaded['id']}/download")
        assert got.status_code == 200 and got.content == b"\x00kept\xff"
        assert got.headers["etag"] == f'"{uploaded["sha256"]}"'

        # The interrupted job failed, clearly, and left nothing behind.
        lost = c.get(f"/v1/jobs/{running}").json()
        assert lost["status"] == "failed"
        assert lost["error"] == "interrupted by server restart"
        assert lost["artifacts"] == [] and lost["result"] is None
        assert lost["finished_at"] is not None and lost["started_at"] is not None
        assert 0 < lost["progress"] < 1
        assert c.get("/v1/files", params={"job_id": running}).json()["files"] == []
        assert c.get(f"/v1/files/{partial.id}").status_code == 404
        assert c.delete(f"/v1/jobs/{running}").status_code == 409

        # The queued jobs run to success, in order.
        finished = [terminal(c, q) for q in queued]
        for i, job in enumerate(finished):
            assert job["status"] == "succeeded", job
            assert job["result"]["text"] == f"queued {i}"
            assert (
                c.get(f"/v1/files/{job['artifacts'][0]}/download").content == f"queued {i}".encode()
            )
        assert finished[0]["started_at"] <= finished[1]["started_at"]

        listing = c.get("/v1/jobs").json()["jobs"]
        assert {j["id"]: j["status"] for j in listing} == {
            done["id"]: "succeeded",
            running: "failed",
            queued[0]: "succeeded",
            queued[1]: "succeeded",
        }
        health = c.get("/health").json()
        assert health["queue"] == {"waiting": 0, "running": 0}

        # On disk: exactly the blobs of the files that exist, no temp files.
        files = {f["id"] for f in c.get("/v1/files").json()["files"]}
        assert files == {file_id, uploaded["id"], *(j["artifacts"][0] for j in finished)}
        assert {p.name for p in (home / "files" / "blobs").iterdir()} == files
        assert list((home / "files" / "tmp").iterdir()) == []


def test_graceful_stop_interrupts_the_running_job(live_server: Callable[..., Any]) -> None:
    """SIGTERM with a job running: the job stops at its next step, fails, and nothing is left."""
    server = live_server(ENV)
    with server.client() as c:
        job_id = c.post(
            ECHO, json={"text": "stopped", "steps": 500, "delay_s": 0.05, "mode": "async"}
        ).json()["job_id"]
        queued = c.post(
            ECHO, json={"text": "next", "steps": 1, "delay_s": 0, "mode": "async"}
        ).json()["job_id"]
        wait_for(lambda: c.get(f"/v1/jobs/{job_id}").json()["status"] == "running")
    started = time.monotonic()
    server.stop()
    # uvicorn re-raises SIGTERM after its graceful shutdown.
    assert server.proc.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log.read_text()
    # Without the interruption the server would wait for the 25 s job (up to its own limit).
    assert time.monotonic() - started < 10
    restarted = live_server(ENV, home=server.home)
    with restarted.client() as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "failed" and job["error"] == "interrupted by server shutdown"
        assert job["artifacts"] == []
        assert c.get("/v1/files", params={"job_id": job_id}).json()["files"] == []
        done = terminal(c, queued)
        assert done["status"] == "succeeded"
