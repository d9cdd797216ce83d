"""Bounded load on loopback: many clients submit and poll at once; nothing is lost, the queue
bound answers 429 + Retry-After, and the server's memory settles.

Each round, 50 concurrent clients make 500 async submits to the echo plugin between them and
poll every accepted job until it ends. The queue holds at most KIAPI_MAX_QUEUE=8 waiting jobs,
so the excess is refused. Meanwhile a light client of its own probes GET /v1/jobs/{id}: its
p50/p99 are the server's latency under that load (the 50 asyncio clients in one Python process
mostly measure their own event loop; their view is printed too). The loop is bounded in count
and time and stops by itself. The server's RSS after each round is printed and must settle.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from reliability import ECHO, assert_healthy, percentile, report, rss_kib, unfinished

from kiapi_core.testing import LiveServer, start_server

CLIENTS = 50
SUBMITS_PER_ROUND = 500
ROUNDS = 4  # the first one warms up (imports, caches, SQLite pages)
MAX_QUEUE = 8
ROUND_DEADLINE_S = 240
PROBE_INTERVAL_S = 0.005
# Growth allowed between the end of the warm-up round and the end of the last one.
RSS_SLACK_KIB = 16 * 1024


@dataclass
class Round:
    accepted: list[str] = field(default_factory=list)
    refused: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    poll_s: list[float] = field(default_factory=list)  # as the 50 loaded clients saw them
    probe_s: list[float] = field(default_factory=list)  # as the light probe saw them
    retry_after: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


async def _client(c: httpx.AsyncClient, n: int, index: int, out: Round, deadline: float) -> None:
    for i in range(n):
        if time.monotonic() > deadline:
            out.errors.append("round deadline passed")
            return
        r = await c.post(
            ECHO, json={"text": f"c{index}-{i}", "steps": 1, "delay_s": 0, "mode": "async"}
        )
        if r.status_code == 429:
            out.refused += 1
            out.retry_after.add(r.headers.get("retry-after", ""))
            if "KIAPI_MAX_QUEUE" not in r.json()["detail"]:
                out.errors.append(f"429 without the setting named: {r.text}")
            await asyncio.sleep(0.02)
            continue
        if r.status_code != 202:
            out.errors.append(f"submit answered {r.status_code}: {r.text[:200]}")
            continue
        job_id = r.json()["job_id"]
        out.accepted.append(job_id)
        while time.monotonic() < deadline:
            started = time.perf_counter()
            polled = await c.get(f"/v1/jobs/{job_id}")
            out.poll_s.append(time.perf_counter() - started)
            if polled.status_code != 200:
                out.errors.append(f"poll answered {polled.status_code}")
                break
            status = polled.json()["status"]
            if status in ("succeeded", "failed", "canceled"):
                out.statuses[status] += 1
                break
            await asyncio.sleep(0.01)
        else:
            out.errors.append(f"job {job_id} did not end before the round deadline")


async def _clients(url: str, out: Round) -> None:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    deadline = time.monotonic() + ROUND_DEADLINE_S
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        await asyncio.gather(
            *(_client(c, SUBMITS_PER_ROUND // CLIENTS, i, out, deadline) for i in range(CLIENTS))
        )


def _probe(url: str, out: Round, first: str, stop: threading.Event) -> None:
    """GET the newest accepted job every few milliseconds on one kept-alive connection."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        while not stop.wait(PROBE_INTERVAL_S):
            job_id = out.accepted[-1] if out.accepted else first
            started = time.perf_counter()
            conn.request("GET", f"/v1/jobs/{job_id}")
            response = conn.getresponse()
            response.read()
            out.probe_s.append(time.perf_counter() - started)
            if response.status != 200:
                out.errors.append(f"probe answered {response.status}")
    finally:
        conn.close()


def run_round(url: str, first: str) -> Round:
    out = Round()
    stop = threading.Event()
    probe = threading.Thread(target=_probe, args=(url, out, first, stop), daemon=True)
    probe.start()
    try:
        asyncio.run(_clients(url, out))
    finally:
        stop.set()
        probe.join(30)
    return out


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.1f}"


@pytest.fixture
def server(tmp_path: Path) -> LiveServer:
    return start_server(
        tmp_path / "home",
        {"KIAPI_PLUGINS": "echo", "KIAPI_WORKERS": "1", "KIAPI_MAX_QUEUE": str(MAX_QUEUE)},
    )


def test_bounded_load(server: LiveServer, request: pytest.FixtureRequest) -> None:
    try:
        with server.client() as c:
            first = c.post(ECHO, json={"text": "first"}, headers={"Accept": "application/json"})
            assert first.status_code == 200
        rounds: list[Round] = []
        rss: list[int] = []
        started = time.monotonic()
        for n in range(ROUNDS):
            out = run_round(server.url, first.json()["id"])
            rounds.append(out)
            assert out.errors == [], out.errors[:5]
            # Every accepted job finished, and finished well.
            assert out.statuses == Counter({"succeeded": len(out.accepted)}), out.statuses
            assert len(out.accepted) + out.refused == SUBMITS_PER_ROUND
            # The excess was refused with a usable Retry-After (whole seconds, at least 1).
            assert out.refused > 0, "the queue bound was never reached"
            assert all(v.isdigit() and int(v) >= 1 for v in out.retry_after), out.retry_after
            rss.append(rss_kib(server.proc.pid))
            report(
                request.config,
                f"load round {n + 1}: {len(out.accepted)} accepted, {out.refused} refused (429);"
                f" GET /v1/jobs/{{id}} p50 {_ms(out.probe_s, 50)} ms p99 {_ms(out.probe_s, 99)} ms"
                f" over {len(out.probe_s)} probes (the loaded clients saw p50"
                f" {_ms(out.poll_s, 50)} ms p99 {_ms(out.poll_s, 99)} ms over {len(out.poll_s)}"
                f" polls); server RSS {rss[-1] / 1024:.1f} MiB",
            )
        probes = [s for r in rounds for s in r.probe_s]
        report(
            request.config,
            f"load: {ROUNDS} x {SUBMITS_PER_ROUND} submits from {CLIENTS} clients in"
            f" {time.monotonic() - started:.1f}s; GET /v1/jobs/{{id}} under load p50"
            f" {_ms(probes, 50)} ms, p99 {_ms(probes, 99)} ms;"
            f" server RSS after each round (MiB): {', '.join(f'{k / 1024:.1f}' for k in rss)}",
        )
        # Memory settles: after the warm-up round, more rounds of the same work do not grow it.
        assert rss[-1] - rss[0] <= RSS_SLACK_KIB, rss
        with server.client() as c:
            assert unfinished(c) == []
            total = 1 + sum(len(r.accepted) for r in rounds)
            listed = c.get("/v1/jobs", params={"status": "succeeded", "limit": "500"}).json()
            assert len(listed["jobs"]) == min(total, 500)
        assert_healthy(server)
    finally:
        server.stop()
