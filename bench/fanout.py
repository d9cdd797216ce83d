"""Thousands of SSE followers: is every progress event still delivered at once?

Starts `kiapi serve` (echo plugin, one job slot per followed job), submits echo jobs that report
progress at 20 Hz with the report's Unix time in the label (`stamp`), then from ONE separate
client process (asyncio, raw sockets) opens N followers spread over them (`GET
/v1/jobs/{id}/events`), and from another process probes `GET /health` and `GET /v1/jobs/{id}`.
Prints, per N: delivery lag p50/p99/max (report time -> client receipt, same machine clock,
counted once every follower's stream has opened), the probes' p50/p99, the API's peak RSS and fds.

    uv run python bench/fanout.py [--sizes 100,1000,2000] [--seconds 8] [--json]
    uv run python bench/fanout.py --before /tmp/base   # an older kiapi_core side by side
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
import httpx
from _harness import pct, rss_mb, table

from kiapi_core.testing import start_server

ROOT = Path(__file__).resolve().parent.parent
ECHO = "/v1/text/echo/run"
HZ = 20

# The followers: one process, asyncio protocols (no per-event object churn beyond a scan).
FOLLOWERS = r"""
import asyncio, json, resource, sys, time
host, port, n, ids = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
try:
    import uvloop
    uvloop.install()
except ImportError:
    pass
samples, state = [], {"opened": 0, "ended": 0, "since": None, "events": 0}

class Follower(asyncio.Protocol):
    def __init__(self, done):
        self.done, self.tail, self.opened = done, b"", False
    def data_received(self, data):
        now = time.time()
        if not self.opened:
            # Following from its first bytes (the response head and the job's state): a
            # connected socket whose request the server has not answered yet follows nothing.
            self.opened = True
            state["opened"] += 1
            if state["opened"] == n:
                state["since"] = now
        data = self.tail + data
        cut = data.rfind(b"\n\n")
        self.tail = data[cut + 2:] if cut >= 0 else data
        if cut < 0:
            return
        body = data[:cut]
        since = state["since"]
        at = body.find(b" @")
        while at >= 0:
            end = body.find(b'"', at)
            state["events"] += 1
            if since is not None:
                sent = float(body[at + 2:end])
                if sent >= since:
                    # A Redis stream id is the journal write's time (ms): the lag before it
                    # is the worker's, the rest the API node's and this client's.
                    start = body.rfind(b"id: ", 0, at)
                    ms, dash, _ = body[start + 4:body.find(b"\n", start)].partition(b"-")
                    stored = int(ms) / 1000 - sent if start >= 0 and dash else None
                    samples.append((sent, now - sent, stored))
            at = body.find(b" @", end)
        if b"event: end" in body and not self.done.done():
            self.done.set_result(None)
    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(None)

async def one(i, loop):
    done = loop.create_future()
    job = ids[i % len(ids)]
    for attempt in range(50):
        try:
            transport, _ = await loop.create_connection(lambda: Follower(done), host, port)
            break
        except OSError:
            await asyncio.sleep(0.05)
    req = f"GET /v1/jobs/{job}/events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
    transport.write(req.encode())
    await done
    state["ended"] += 1
    transport.close()

async def main():
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(200)  # connect in waves: the accept backlog is finite
    async def guarded(i):
        async with sem:
            pass
        await one(i, loop)
    await asyncio.gather(*(guarded(i) for i in range(n)))

t0 = time.time()
asyncio.run(main())
# Every sample: the parent counts those sent once every client's followers were following.
out = {"samples": samples, "since": state["since"], "ended": state["ended"]}
sys.stdout.write(json.dumps({**out, "events": state["events"]}) + "\n")
"""

PROBE = r"""
import json, sys, time, httpx
url, job, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
lat = {"health": [], "job": []}
t0 = time.perf_counter()
with httpx.Client(base_url=url, timeout=30) as c:
    while time.perf_counter() - t0 < seconds:
        for name, path in (("health", "/health"), ("job", f"/v1/jobs/{job}")):
            at, start = time.time(), time.perf_counter()
            c.get(path)
            lat[name].append((at, time.perf_counter() - start))
        time.sleep(0.02)
print(json.dumps(lat))
"""


def cpu_s(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """All cores' busy and total jiffies so far (/proc/stat), for the share of the machine used."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]
    return sum(ticks) - idle, sum(ticks)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def ensure_stamping_echo() -> None:
    """The echo plugin as in this checkout (its `stamp` field is what the lag is read from)."""
    subprocess.run(
        [
            "uv",
            "pip",
            "install",
            "-q",
            "--python",
            sys.executable,
            "--reinstall-package",
            "kiapi-echo",
            str(ROOT / "tests" / "plugins" / "echo"),
        ],
        check=True,
        capture_output=True,
    )


@dataclass(frozen=True)
class Node:
    """One API node followers connect to: its base URL and its process (for RSS, fds, CPU)."""

    url: str
    pid: int


def submit_jobs(url: str, jobs: int, steps: int) -> list[str]:
    """``jobs`` async echo jobs reporting at HZ with a time stamp, for ``steps`` reports."""
    body = {"text": "fan", "steps": steps, "delay_s": 1 / HZ, "stamp": True, "mode": "async"}
    with httpx.Client(base_url=url, timeout=30) as c:
        ids = []
        for _ in range(jobs):
            r = c.post(ECHO, json=body)
            r.raise_for_status()
            ids.append(r.json()["job_id"])
    return ids


def lag_summary(samples: list[list[Any]], since: float | None) -> dict[str, Any]:
    """Lag p50/p99/max (ms) of the events sent after ``since`` (samples: sent, lag, the part
    before the journal write or None), of that part (Redis ids only), and p99/max of the
    events sent before: to the streams already open while the others still opened."""
    kept = [s for s in samples if since is not None and s[0] >= since]
    lags = [s[1] * 1000 for s in kept]
    stored = [s[2] * 1000 for s in kept if s[2] is not None]
    opening = [s[1] * 1000 for s in samples if since is None or s[0] < since]
    return {
        "p50": pct(lags, 50) if lags else None,
        "p99": pct(lags, 99) if lags else None,
        "max": max(lags, default=None),
        "n": len(lags),
        "stored p99": pct(stored, 99) if stored else None,
        "stored max": max(stored, default=None),
        "opening p99": pct(opening, 99) if opening else None,
        "opening max": max(opening, default=None),
    }


def probe_ms(samples: list[list[float]], since: float | None) -> list[float]:
    """The probe latencies (ms) of the requests sent once every follower was following
    (every one when no client got that far)."""
    kept = [lat for at, lat in samples if since is None or at >= since]
    return [lat * 1000 for lat in kept or [lat for _, lat in samples]]


def run_size(nodes: list[Node], n: int, jobs: int, seconds: float) -> list[dict[str, Any]]:
    """N followers split over ``nodes`` (the jobs submitted to the first); one row per node:
    its followers' lag, probes of that node, its peak RSS / fds and CPU per event."""
    connect_allowance = 3 + n / 400
    steps = int(HZ * (seconds + connect_allowance))
    ids = submit_jobs(nodes[0].url, jobs, steps)
    shares = [n // len(nodes) + (1 if i < n % len(nodes) else 0) for i in range(len(nodes))]
    cpu_before = [cpu_s(node.pid) for node in nodes]
    busy_before = machine_busy()
    followers, probes = [], []
    for node, share in zip(nodes, shares, strict=True):
        host, port = node.url.removeprefix("http://").split(":")
        followers.append(
            subprocess.Popen(
                [sys.executable, "-c", FOLLOWERS, host, port, str(share), ",".join(ids)],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
        probes.append(
            subprocess.Popen(
                [sys.executable, "-c", PROBE, node.url, ids[0], str(seconds + connect_allowance)],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    peak = [{"rss": 0.0, "fds": 0} for _ in nodes]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for node, p in zip(nodes, peak, strict=True):
                try:
                    p["rss"] = max(p["rss"], rss_mb(node.pid))
                    p["fds"] = max(p["fds"], fds(node.pid))
                except OSError:
                    pass
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    outs = [f.communicate(timeout=steps / HZ * 3 + 120)[0] for f in followers]
    probe_outs = [p.communicate(timeout=120)[0] for p in probes]
    stop.set()
    sampler.join()
    busy, total = (a - b for a, b in zip(machine_busy(), busy_before, strict=True))
    rows = []
    gots = [json.loads(out) for out in outs]
    # One window for every node, from the moment every stream of every client is open: the
    # server answering a burst of new streams delays the events of those already open (shown
    # apart, "while opening"), and counting it would measure connecting, not fan-out.
    since = max((g["since"] for g in gots if g["since"] is not None), default=None)
    for i, node in enumerate(nodes):
        cpu = cpu_s(node.pid) - cpu_before[i]
        got = gots[i]
        ms = {k: probe_ms(vals, since) for k, vals in json.loads(probe_outs[i]).items()}
        lag = lag_summary(got["samples"], since)
        rows.append(
            {
                "node": i + 1,
                "followers": n,
                "on node": shares[i],
                "jobs": jobs,
                "events": got["events"],
                "lag p50 ms": lag["p50"],
                "lag p99 ms": lag["p99"],
                "lag max ms": lag["max"],
                "lag n": lag["n"],
                # Of the lag, the part before the journal write (the worker's; Redis ids only).
                "to store p99 ms": lag["stored p99"],
                "to store max ms": lag["stored max"],
                "opening lag p99 ms": lag["opening p99"],
                "opening lag max ms": lag["opening max"],
                "health p50 ms": pct(ms["health"], 50),
                "health p99 ms": pct(ms["health"], 99),
                "job p50 ms": pct(ms["job"], 50),
                "job p99 ms": pct(ms["job"], 99),
                "rss MB": peak[i]["rss"],
                "fds": peak[i]["fds"],
                "ended": got["ended"],
                # API CPU per thousand events delivered: the cost of fan-out, whatever the noise.
                "cpu ms/1k events": cpu * 1e6 / max(1, got["events"]),
                # Every process on the machine (followers, probes, other nodes, other users):
                # near 100 % the lag measures the CPU queue, not the design.
                "machine busy %": 100 * busy / max(1, total),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,1000,2000")
    parser.add_argument("--jobs", type=int, default=2, help="Jobs followed (run at once).")
    parser.add_argument("--seconds", type=float, default=8.0, help="Measured time per size.")
    parser.add_argument(
        "--before",
        help="Also serve the kiapi_core of this checkout (e.g. `git archive <rev> kiapi_core`"
        " unpacked), side by side per size, and print both.",
    )
    parser.add_argument("--rounds", type=int, default=1, help="Interleaved rounds per size.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ensure_stamping_echo()
    env = {
        "KIAPI_PLUGINS": "echo",
        "KIAPI_WORKERS": str(args.jobs),
        "KIAPI_MAX_CONNECTIONS": "5000",
        "KIAPI_LOG_LEVEL": "warning",
    }
    cores = [("before", args.before), ("after", None)] if args.before else [("", None)]
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for label, core in cores * args.rounds:
            # -m puts the working directory (this checkout) ahead of PYTHONPATH: PYTHONSAFEPATH.
            run_env = (
                {**env, "PYTHONPATH": str(Path(core).resolve()), "PYTHONSAFEPATH": "1"}
                if core
                else env
            )
            home = Path(tempfile.mkdtemp(prefix="kiapi-fanout-"))
            server = start_server(home, run_env)
            try:
                (row,) = run_size([Node(server.url, server.proc.pid)], n, args.jobs, args.seconds)
                rows.append({"core": label, **row})
            finally:
                server.stop()
    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print(
        table(
            rows,
            [
                "core",
                "followers",
                "lag p50 ms",
                "lag p99 ms",
                "lag max ms",
                "opening lag p99 ms",
                "health p50 ms",
                "health p99 ms",
                "job p50 ms",
                "job p99 ms",
                "rss MB",
                "fds",
                "cpu ms/1k events",
                "ended",
            ],
        )
    )
    print("targets at 2,000 followers: lag p99 <= 100 ms, /health p99 <= 20 ms, RSS <= 150 MB")


if __name__ == "__main__":
    main()
