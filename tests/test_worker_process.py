"""The worker process (KIAPI_WORKER_MODE=process, the default): jobs run in a child process.

Checked on real servers: the child starts with the first job, dies with the server, and when
it dies mid-job (the OOM killer, a segfault in native model code) the job fails naming it,
its files are removed, and the next job runs in a fresh worker while the API stays up.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from kiapi_core.app import create_app
from kiapi_core.runtime import process
from kiapi_core.settings import Settings
from kiapi_core.testing import wait_for

ECHO = "/v1/text/echo/run"
ENV = {"KIAPI_PLUGINS": "echo", "KIAPI_WORKERS": "1"}
JSON = {"Accept": "application/json"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose: it runs nothing and holds no model.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def worker(c: Any) -> dict[str, Any]:
    info: dict[str, Any] = c.get("/health").json()["worker"]
    return info


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def test_the_worker_starts_with_the_first_job_and_runs_it(
    live_server: Callable[..., Any],
) -> None:
    server = live_server(ENV)
    with server.client() as c:
        before = worker(c)
        assert before == {
            "mode": "process",
            "slots": 1,
            "pid": None,
            "restarts": 0,
            "recycles": 0,
            "rss_mb": None,
        }
        assert children(server.proc.pid) == set()  # an idle server is one small process
        r = c.post(ECHO, json={"text": "hello", "steps": 2}, headers=JSON)
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        pid = worker(c)["pid"]
        assert isinstance(pid, int) and pid != server.proc.pid and alive(pid)
        assert worker(c)["rss_mb"] > 0  # the worker's real resident memory
        assert children(server.proc.pid) == {pid}
        # The worker yields the CPU to the API: SCHED_IDLE and nice 19, the server neither.
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        assert os.getpriority(os.PRIO_PROCESS, pid) == 19
        assert os.sched_getscheduler(server.proc.pid) == os.SCHED_OTHER
        assert os.getpriority(os.PRIO_PROCESS, server.proc.pid) == 0
        # The API process mirrors what the worker holds.
        echo = next(m for m in c.get("/v1/models").json()["data"] if m["id"] == "echo/echo-1")
        assert echo["resident"] is True and echo["loads"] == 1
        assert c.get("/health").json()["models"]["resident"] == 1


def test_a_worker_killed_mid_job_fails_that_job_and_is_replaced(
    live_server: Callable[..., Any],
) -> None:
    server = live_server(ENV)
    with server.client() as c:
        first = c.post(ECHO, json={"text": "warm", "steps": 1}, headers=JSON).json()
        assert first["status"] == "succeeded"
        pid = worker(c)["pid"]
        doomed = c.post(
            ECHO, json={"text": "doomed", "steps": 400, "delay_s": 0.05, "mode": "async"}
        ).json()["job_id"]
        queued = c.post(ECHO, json={"text": "next", "steps": 1, "mode": "async"}).json()["job_id"]
        wait_for(lambda: (c.get(f"/v1/jobs/{doomed}").json()["progress"] or 0) > 0)

        os.kill(pid, signal.SIGKILL)  # what the OOM killer does

        job = wait_for(
            lambda: (j := c.get(f"/v1/jobs/{doomed}").json())["status"] == "failed" and j
        )
        assert "worker process exited" in job["error"] and "-9" in job["error"], job["error"]
        assert job["artifacts"] == []
        # The queued job runs in the replacement worker; the API never went down.
        after = wait_for(
            lambda: (j := c.get(f"/v1/jobs/{queued}").json())["status"] == "succeeded" and j
        )
        assert after["result"]["text"] == "next"
        info = worker(c)
        assert info["restarts"] == 1 and info["pid"] not in (None, pid)
        assert not alive(pid)
        echo = next(m for m in c.get("/v1/models").json()["data"] if m["id"] == "echo/echo-1")
        assert echo["loads"] == 2  # once per worker: the counts add up across restarts
        assert c.get("/v1/files", params={"job_id": doomed}).json()["files"] == []
    assert "Traceback" not in server.output().split("worker process exited")[0]


def test_the_worker_dies_with_a_killed_server(live_server: Callable[..., Any]) -> None:
    server = live_server(ENV)
    with server.client() as c:
        c.post(ECHO, json={"text": "start it", "steps": 1}).raise_for_status()
        c.post(ECHO, json={"text": "busy", "steps": 400, "delay_s": 0.05, "mode": "async"})
        pid = worker(c)["pid"]
    server.kill()
    wait_for(lambda: not alive(pid), timeout=10)


def test_a_graceful_stop_ends_the_running_job_and_the_worker(
    live_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = live_server(ENV)
    with server.client() as c:
        running = c.post(
            ECHO, json={"text": "long", "steps": 400, "delay_s": 0.05, "mode": "async"}
        ).json()["job_id"]
        wait_for(lambda: (c.get(f"/v1/jobs/{running}").json()["progress"] or 0) > 0)
        pid = worker(c)["pid"]
        # Ctrl-C or a service manager's SIGTERM may reach every process: the worker leaves
        # its ending to the server. It shares the server's session (and so its CPU autogroup,
        # where nice and SCHED_IDLE rank it below the server).
        assert os.getsid(pid) == os.getsid(server.proc.pid)
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        assert alive(pid) and c.get(f"/v1/jobs/{running}").json()["status"] == "running"
    server.stop()
    assert "Application shutdown complete" in server.output()
    assert not alive(pid)
    restarted = live_server(ENV, home=server.home)
    with restarted.client() as c:
        job = c.get(f"/v1/jobs/{running}").json()
        assert job["status"] == "failed" and job["error"] == "interrupted by server shutdown"


def test_a_worker_that_cannot_start_fails_queued_jobs_clearly(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "WORKER_MODULE", "kiapi_core.no_such_module")
    with TestClient(create_app(make_settings())) as c:
        r = c.post(ECHO, json={"text": "nobody runs me"}, headers=JSON)
        assert r.status_code == 500, r.text
        assert "worker process could not start" in r.json()["detail"]
        info = c.get("/health").json()["worker"]
        assert info["mode"] == "process" and info["pid"] is None
        # Every new job tries again (after a pause), and says the same.
        started = time.monotonic()
        again = c.post(ECHO, json={"text": "me neither"}, headers=JSON)
        assert "worker process could not start" in again.json()["detail"]
        assert time.monotonic() - started < 10


def test_thread_mode_runs_jobs_in_the_server(live_server: Callable[..., Any]) -> None:
    server = live_server({**ENV, "KIAPI_WORKER_MODE": "thread", "KIAPI_WORKER_NICE": "5"})
    with server.client() as c:
        r = c.post(ECHO, json={"text": "here", "steps": 2}, headers=JSON)
        assert r.json()["status"] == "succeeded"
        info = worker(c)
        assert info["mode"] == "thread" and info["slots"] == 1 and info["rss_mb"] > 0
        assert children(server.proc.pid) == set()
    # Only the slot thread is reniced (Python 3.11 does not name OS threads: find it by
    # priority), and never SCHED_IDLE: holding the GIL there would starve the event loop.
    threads = [int(t.name) for t in Path(f"/proc/{server.proc.pid}/task").iterdir()]
    lowered = [t for t in threads if os.getpriority(os.PRIO_PROCESS, t) == 5]
    assert len(lowered) == 1, lowered
    assert all(os.sched_getscheduler(t) == os.SCHED_OTHER for t in threads)
    assert os.getpriority(os.PRIO_PROCESS, server.proc.pid) == 0


def test_an_idle_worker_with_nothing_loaded_exits_and_comes_back(
    live_server: Callable[..., Any],
) -> None:
    server = live_server({**ENV, "KIAPI_MODEL_IDLE_TTL_S": "1", "KIAPI_SWEEP_INTERVAL_S": "0.2"})
    with server.client() as c:
        c.post(ECHO, json={"text": "one", "steps": 1}).raise_for_status()
        pid = worker(c)["pid"]
        # The idle TTL unloads the model, then the worker gives its memory back by exiting.
        wait_for(lambda: worker(c)["pid"] is None, timeout=20)
        assert not alive(pid) and children(server.proc.pid) == set()
        assert c.get("/health").json()["models"]["resident"] == 0
        r = c.post(ECHO, json={"text": "two", "steps": 1}, headers=JSON)
        assert r.json()["status"] == "succeeded"
        info = worker(c)
        assert info["restarts"] == 0 and info["pid"] not in (None, pid)
    log = server.output()
    assert "restarting" not in log and "bad message" not in log, log
    assert "no model loaded; exiting" in log and "serving ['echo', 'kiapi.load']" in log


def test_a_server_with_many_open_files_still_runs_jobs(
    make_settings: Callable[..., Settings],
) -> None:
    """The worker's pipes land past FD_SETSIZE (1024) in a busy server: select() would fail."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with TestClient(create_app(make_settings())) as c:
            r = c.post(ECHO, json={"text": "past 1024", "steps": 2}, headers=JSON)
            assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
