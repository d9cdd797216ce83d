"""The client commands against a live server: generate, jobs, files, Ctrl-C.

One echo server with an API key for the module, so every command also proves it sends
``Authorization: Bearer $KIAPI_API_KEY``. Each command runs as its own process, as a user runs it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiapi_core.testing import LiveServer, free_port, kiapi_command, start_server, wait_for

KEY = "client-cli-test-key-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(
        tmp_path_factory.mktemp("client-cli"), {"KIAPI_PLUGINS": "echo", "KIAPI_API_KEY": KEY}
    )
    yield live
    live.stop()


def kiapi(
    server: LiveServer, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        kiapi_command(*args),
        env=_env(server, env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _env(server: LiveServer, extra: dict[str, str] | None = None) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KIAPI_")}
    return {**clean, "KIAPI_URL": server.url, "KIAPI_API_KEY": KEY, **(extra or {})}


def submit(server: LiveServer, **body: Any) -> str:
    response = httpx.post(
        f"{server.url}/v1/text/echo/run", json={"mode": "async", **body}, headers=AUTH
    )
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def job(server: LiveServer, job_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=AUTH).json())


def test_generate_shows_progress_downloads_and_prints_the_job(
    server: LiveServer, tmp_path: Path
) -> None:
    out = tmp_path / "nested" / "out.txt"
    result = kiapi(
        server, "generate", "-c", "echo", "hello there", "-o", str(out),
        "-p", "steps=5", "-p", "delay_s=0.05",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "hello there"
    lines = result.stdout.splitlines()
    job_id = re.fullmatch(r"job: (job_[0-9a-f]{16})", lines[0])
    assert job_id, result.stdout
    assert re.fullmatch(
        rf"file: file_[0-9a-f]{{16}} -> {re.escape(str(out))} \(11 bytes\)", lines[1]
    )
    params = json.loads(lines[2].removeprefix("params: "))
    assert params["text"] == "hello there" and params["steps"] == 5
    # The bar, one line per change when stderr is not a terminal, fed by the event stream.
    progress = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert any("step 3/5" in line for line in progress), result.stderr
    assert progress[-1].endswith("100.0%  done")
    percents = [float(re.search(r"(\d+\.\d)%", line).group(1)) for line in progress]  # type: ignore[union-attr]
    assert percents == sorted(percents) and len(set(percents)) >= 4
    assert f"{job_id.group(1)} submitted to text/echo" in result.stderr
    assert job(server, job_id.group(1))["status"] == "succeeded"


def test_generate_reads_the_prompt_from_a_file(server: LiveServer, tmp_path: Path) -> None:
    (tmp_path / "prompt.txt").write_text("from a file\n")
    result = kiapi(server, "generate", "@prompt.txt", "-o", "got.txt", cwd=tmp_path)
    # Only echo can generate on this server, so --capability may be left out.
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "got.txt").read_text() == "from a file"


@pytest.mark.parametrize(
    ("args", "env", "code", "says"),
    [
        (["-c", "nope", "x"], {}, 2, "the server has no capability 'nope'; it has: text/echo"),
        (["-c", "echo", "x", "--preset", "V4_TURBO_12"], {}, 2, "echo does not take preset"),
        (["-c", "echo", "x", "-p", "steps"], {}, 2, "'steps' is not KEY=VALUE"),
        (["-c", "echo", "x", "--size", "big"], {}, 2, "'big' is not WIDTHxHEIGHT"),
        (["-c", "echo", "x", "-p", "steps=0"], {}, 1, "answered 422: steps: Input should be"),
        (["-c", "echo", "x"], {"KIAPI_API_KEY": "wrong"}, 1, "answered 401: invalid API key"),
        (["-c", "echo", "x"], {"KIAPI_URL": "http://127.0.0.1:9"}, 1, "cannot reach kiapi"),
    ],
    ids=["capability", "field", "param", "size", "server-422", "key", "unreachable"],
)
def test_generate_errors_say_what_to_fix(
    server: LiveServer, args: list[str], env: dict[str, str], code: int, says: str
) -> None:
    result = kiapi(server, "generate", *args, env=env)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert says in result.stderr


def test_ctrl_c_cancels_the_job_on_the_server(server: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "never.txt"
    proc = subprocess.Popen(
        kiapi_command(
            "generate",
            "-c",
            "echo",
            "slow",
            "-o",
            str(out),
            "-p",
            "steps=400",
            "-p",
            "delay_s=0.05",
        ),
        env=_env(server),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    # Wait until the job runs: its progress lines are on stderr.
    seen = ""
    while "step 2/400" not in seen:
        line = proc.stderr.readline()
        assert line, f"generate ended early: {seen}"
        seen += line
    job_id = re.search(r"(job_[0-9a-f]{16}) submitted", seen).group(1)  # type: ignore[union-attr]
    proc.send_signal(signal.SIGINT)
    stdout, rest = proc.communicate(timeout=30)
    assert proc.returncode == 130, rest
    assert f"interrupted: canceling {job_id}" in rest and f"{job_id} canceled" in rest
    assert stdout == "" and not out.exists()
    assert job(server, job_id)["status"] == "canceled"


def test_jobs_list_show_and_cancel(server: LiveServer) -> None:
    job_id = submit(server, text="long", steps=400, delay_s=0.05)
    wait_for(lambda: job(server, job_id)["eta_s"] is not None)

    listed = kiapi(server, "jobs", "list", "--status", "running")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "TYPE", "STATUS", "PROGRESS", "LABEL", "ETA", "CREATED"]
    assert any(
        row.startswith(job_id) and " echo " in row and " running " in row and " left " in row
        for row in rows
    )

    as_json = json.loads(kiapi(server, "jobs", "list", "--type", "echo", "--json").stdout)
    assert job_id in [j["id"] for j in as_json]
    limited = json.loads(kiapi(server, "jobs", "list", "--limit", "1", "--json").stdout)
    assert len(limited) == 1

    shown = kiapi(server, "jobs", "show", job_id)
    assert shown.returncode == 0 and json.loads(shown.stdout)["params"]["text"] == "long"

    canceled = kiapi(server, "jobs", "cancel", job_id)
    assert canceled.returncode == 0, canceled.stderr
    assert canceled.stdout.startswith(job_id)
    wait_for(lambda: job(server, job_id)["status"] == "canceled")

    again = kiapi(server, "jobs", "cancel", job_id)
    assert (
        again.returncode == 1
        and "answered 409" in again.stderr
        and "already canceled" in again.stderr
    )
    missing = kiapi(server, "jobs", "show", "job_0123456789abcdef")
    assert missing.returncode == 1 and "answered 404" in missing.stderr


def test_files_list_and_download(server: LiveServer, tmp_path: Path) -> None:
    response = httpx.post(
        f"{server.url}/v1/text/echo/run",
        json={"text": "file me"},
        headers={**AUTH, "accept": "application/json"},
    )
    job_id = response.json()["id"]
    file_id = response.json()["artifacts"][0]

    listed = kiapi(server, "files", "list", "--job", job_id)
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "BYTES", "TYPE", "NAME", "JOB", "CREATED"]
    assert len(rows) == 1 and rows[0].split()[:5] == [
        file_id,
        "7",
        "text/plain",
        "echo.txt",
        job_id,
    ]
    assert file_id in [f["id"] for f in json.loads(kiapi(server, "files", "list", "--json").stdout)]

    # Default: the file's own name, in the current directory.
    got = kiapi(server, "files", "download", file_id, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "echo.txt").read_text() == "file me"
    assert got.stdout.strip() == f"{file_id} -> echo.txt (7 bytes)"

    named = kiapi(server, "files", "download", file_id, "-o", str(tmp_path / "x" / "y.txt"))
    assert named.returncode == 0 and (tmp_path / "x" / "y.txt").read_text() == "file me"
    to_stdout = kiapi(server, "files", "download", file_id, "-o", "-")
    assert to_stdout.stdout == "file me" and "-> stdout (7 bytes)" in to_stdout.stderr


def test_the_default_url_comes_from_kiapi_host_and_port(server: LiveServer, tmp_path: Path) -> None:
    port = server.url.rsplit(":", 1)[1]
    env = {"KIAPI_URL": "", "KIAPI_HOST": "0.0.0.0", "KIAPI_PORT": port}
    result = kiapi(server, "jobs", "list", "--limit", "1", env={**env, "KIAPI_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    elsewhere = kiapi(server, "jobs", "list", env={**env, "KIAPI_PORT": str(free_port())})
    assert (
        elsewhere.returncode == 1 and "cannot reach kiapi at http://127.0.0.1:" in elsewhere.stderr
    )


def test_generate_takes_wait_priority_and_an_idempotency_key(
    server: LiveServer, tmp_path: Path
) -> None:
    key = f"cli-{os.getpid()}-{tmp_path.name}"
    args = ("generate", "-c", "echo", "keyed", "-o", str(tmp_path / "a.txt"))
    first = kiapi(server, *args, "--idempotency-key", key, "--priority", "4")
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.splitlines()[0].removeprefix("job: ")
    assert job(server, job_id)["priority"] == 4
    again = kiapi(server, *args, "--idempotency-key", key, "--priority", "4")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == f"job: {job_id}"  # the same job, not a new one
    slow = kiapi(
        server, "generate", "-c", "echo", "slow", "--wait", "0.5",
        "-p", "steps=40", "-p", "delay_s=0.1",
    )  # fmt: skip
    assert slow.returncode == 75, slow.stderr
    slow_id = slow.stdout.splitlines()[0].removeprefix("job: ")
    assert "runs on" in slow.stderr and job(server, slow_id)["status"] in ("queued", "running")
    httpx.delete(f"{server.url}/v1/jobs/{slow_id}", headers=AUTH)
    bad = kiapi(server, *args, "--priority", "11")
    assert bad.returncode == 2 and "--priority" in bad.stderr


def test_generate_no_wait_cancel_after_and_webhook(server: LiveServer) -> None:
    queued = kiapi(
        server, "generate", "-c", "echo", "later", "--no-wait", "--cancel-after", "5m",
        "--webhook", "http://127.0.0.1:9/hook", "--webhook-events", "completed",
        "-p", "steps=40", "-p", "delay_s=0.05",
    )  # fmt: skip
    assert queued.returncode == 0, queued.stderr
    job_id = queued.stdout.strip().removeprefix("job: ")
    shown = job(server, job_id)
    assert shown["status"] in ("queued", "running", "succeeded")
    assert shown["deadline"] is not None and shown["deadline"] - shown["created_at"] > 290
    assert shown["webhook"]["url"] == "http://127.0.0.1:9/hook"
    assert shown["webhook"]["events"] == ["completed"]
    httpx.delete(f"{server.url}/v1/jobs/{job_id}", headers=AUTH)
    refused = kiapi(server, "generate", "-c", "echo", "x", "--webhook", "http://10.0.0.1/")
    assert refused.returncode == 1 and "KIAPI_WEBHOOK_ALLOW" in refused.stderr
    assert "X-Kiapi-Webhook" in refused.stderr


def test_jobs_retry_and_priority(server: LiveServer) -> None:
    failed = submit(server, text="boom", fail=True, steps=2)
    wait_for(lambda: job(server, failed)["status"] == "failed")
    retried = kiapi(server, "jobs", "retry", failed, "--priority", "3")
    assert retried.returncode == 0, retried.stderr
    new_id = retried.stdout.splitlines()[-1].removeprefix("job: ")
    assert job(server, new_id)["retry_of"] == failed and job(server, new_id)["priority"] == 3
    again = kiapi(server, "jobs", "retry", failed)
    assert again.returncode == 1 and "already retried" in again.stderr

    # One slot: a long job holds it, so the next one stays queued while its priority changes.
    blocker = submit(server, text="hold", steps=400, delay_s=0.05)
    wait_for(lambda: job(server, blocker)["status"] == "running")
    waiting = submit(server, text="wait", steps=1)
    moved = kiapi(server, "jobs", "priority", waiting, "7")
    assert moved.returncode == 0, moved.stderr
    assert "priority 7" in moved.stdout and job(server, waiting)["priority"] == 7
    httpx.delete(f"{server.url}/v1/jobs/{waiting}", headers=AUTH)
    wait_for(lambda: job(server, waiting)["status"] == "canceled")
    late = kiapi(server, "jobs", "priority", waiting, "1")
    assert late.returncode == 1 and "409" in late.stderr
    bad = kiapi(server, "jobs", "priority", waiting, "11")
    assert bad.returncode == 2
    httpx.delete(f"{server.url}/v1/jobs/{blocker}", headers=AUTH)


def test_the_progress_line_shows_the_eta() -> None:
    import io
    import time

    from kiapi_core.cli.http import ProgressBar

    out = io.StringIO()
    bar = ProgressBar(out)
    running = {"status": "running", "progress": 0.5, "progress_label": "step 2/4", "eta_s": 75.4}
    assert bar.render(running).endswith("step 2/4, ~1m15s left")
    queued = {"status": "queued", "queue_position": 2, "estimated_start_at": time.time() + 9.6}
    assert bar.render(queued).endswith("queued, position 2, starts in ~10s")
    # Off a terminal, a new line per change of phase or percent, not per second of ETA.
    bar.update(running)
    bar.update({**running, "eta_s": 74.0})
    assert len(out.getvalue().splitlines()) == 1
