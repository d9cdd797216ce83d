"""Helpers shared by the reliability suites (fuzzing, bad input, faults, load, auth).

Import from here, never from conftest: these modules run in the same session as everything else.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import httpx
from helpers import run_cli

from kiapi_core.testing import LiveServer, wait_for

OFFLINE = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
ECHO = "/v1/text/echo/run"
GENERATE = "/v1/image/ideogram4/generate"


def ideogram4_home(base: Path) -> Path:
    """A KIAPI_HOME with ideogram4 activated on a freshly built tiny random-weight checkpoint."""
    from kiapi_ideogram4.testing import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint(base / "weights" / "ideogram-4-tiny")
    home = base / "home"
    home.mkdir(parents=True, exist_ok=True)
    done = run_cli(
        "activate",
        "ideogram4",
        "--path",
        str(checkpoint),
        env={**OFFLINE, "KIAPI_HOME": str(home), "KIAPI_PLUGINS": "ideogram4"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return home


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_terminal(client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        current = job(client, job_id)
        return current if current["status"] in TERMINAL else None

    done: dict[str, Any] = wait_for(check, timeout=timeout, interval=0.1)
    return done


def unfinished(client: httpx.Client) -> list[dict[str, Any]]:
    """Every queued or running job (all pages)."""
    out: list[dict[str, Any]] = []
    for status in ("queued", "running"):
        cursor: str | None = None
        while True:
            params = {"status": status, "limit": "500"}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/v1/jobs", params=params).json()
            out.extend(page["jobs"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
    return out


def cancel_everything(client: httpx.Client, timeout: float = 60) -> None:
    """Cancel what is queued or running and wait until nothing is left unfinished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = unfinished(client)
        if not left:
            return
        for item in left:
            client.delete(f"/v1/jobs/{item['id']}")
        time.sleep(0.2)
    raise AssertionError(f"jobs still unfinished after {timeout}s: {unfinished(client)}")


def assert_healthy(server: LiveServer) -> dict[str, Any]:
    assert server.proc.poll() is None, f"server exited:\n{server.output()[-4000:]}"
    with server.client(timeout=10) as c:
        response = c.get("/health")
    assert response.status_code == 200, response.text
    health: dict[str, Any] = response.json()
    assert health["status"] == "ok", health
    return health


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB (Linux /proc, or ps elsewhere)."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    import subprocess

    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return int(out.stdout.strip())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def report(config: Any, line: str) -> None:
    """A line in pytest's terminal output even when output is captured (figures for the log)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:  # pragma: no cover - pytest without its terminal reporter
        print(line, file=sys.stderr)
    elif capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)
    else:
        reporter.write_line(line)
