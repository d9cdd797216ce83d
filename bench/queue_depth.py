"""A deep queue: submit rate, job GET and list paging latency at depths 100 / 1,000 / 10,000.

One `kiapi serve` (embedded, echo plugin, one slot) whose slot is held by a long echo job, so
nothing drains while the queue fills. At each depth, side by side: submit throughput (async
echo jobs from 8 keep-alive clients), `GET /v1/jobs/{id}` p50/p99 of random queued jobs (their
`queue_position` checked), `GET /v1/jobs?status=queued` p50/p99 walking every page with
`next_cursor` (or --max-pages of them); then the blocker is canceled and the time to drain the
whole queue is measured. Targets at 10,000: job GET p99 <= 5 ms, list p99 <= 20 ms, and no
per-request cost that grows with depth (the ratio 10,000 / 100 is printed).

    uv run python bench/queue_depth.py [--depths 100,1000,10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from _harness import ensure_echo_plugin, rss_mb, summary_ms, table

from kiapi_core.testing import LiveServer, start_server, wait_for

JOB = {"text": "q", "steps": 1, "delay_s": 0, "mode": "async"}
SUBMITTERS = 8


def submit(server: LiveServer, n: int) -> tuple[list[str], float]:
    """``n`` async echo jobs from SUBMITTERS keep-alive clients; their ids and jobs/s."""
    per = [n // SUBMITTERS + (1 if i < n % SUBMITTERS else 0) for i in range(SUBMITTERS)]

    def one_client(count: int) -> list[str]:
        with server.client() as c:
            out = []
            for _ in range(count):
                r = c.post("/v1/text/echo/run", json=JOB)
                r.raise_for_status()
                out.append(r.json()["job_id"])
            return out

    started = time.perf_counter()
    with ThreadPoolExecutor(SUBMITTERS) as pool:
        ids = [i for chunk in pool.map(one_client, per) for i in chunk]
    return ids, n / (time.perf_counter() - started)


def job_gets(c: Any, ids: list[str], n: int, depth: int) -> dict[str, float]:
    samples = []
    bad = 0
    for job_id in random.sample(ids, min(n, len(ids))):
        t = time.perf_counter()
        r = c.get(f"/v1/jobs/{job_id}")
        samples.append(time.perf_counter() - t)
        job = r.json()
        bad += not (r.status_code == 200 and 1 <= (job["queue_position"] or 0) <= depth)
    return {**summary_ms(samples), "bad": bad}


def list_pages(c: Any, limit: int, max_pages: int) -> dict[str, float]:
    samples = []
    cursor: str | None = None
    seen = 0
    for _ in range(max_pages):
        params = {"status": "queued", "limit": str(limit)}
        if cursor:
            params["cursor"] = cursor
        t = time.perf_counter()
        r = c.get("/v1/jobs", params=params)
        samples.append(time.perf_counter() - t)
        page = r.json()
        seen += len(page["jobs"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    return {**summary_ms(samples), "pages": len(samples), "jobs_seen": seen}


def hold_slot(c: Any) -> str:
    """An echo job that holds the only slot; cancel is seen at its next report (every 0.2 s)."""
    blocker = c.post("/v1/text/echo/run", json={**JOB, "steps": 1000, "delay_s": 0.2}).json()[
        "job_id"
    ]
    wait_for(lambda: c.get(f"/v1/jobs/{blocker}").json()["status"] == "running")
    return blocker


def fill_and_measure(
    submit_to: LiveServer,
    readers: list[LiveServer],
    depths: list[int],
    gets: int,
    limit: int,
    max_pages: int,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Fill the queue (through ``submit_to``) to each depth and measure job GETs and list
    paging on every reader, side by side; the queued ids and one row per (depth, reader)."""
    ids: list[str] = []
    rows: list[dict[str, Any]] = []
    for depth in depths:
        new, rate = submit(submit_to, depth - len(ids))
        ids += new
        for node, reader in enumerate(readers, 1):
            with reader.client() as c:
                waiting = c.get("/health").json()["queue"]["waiting"]
                get = job_gets(c, ids, gets, depth)
                page = list_pages(c, limit, max_pages)
            rows.append(
                {
                    "depth": depth,
                    **({"node": node} if len(readers) > 1 else {}),
                    "waiting": waiting,
                    "submit/s": rate,
                    "get p50": get["p50"],
                    "get p99": get["p99"],
                    "get bad": get["bad"],
                    "list p50": page["p50"],
                    "list p99": page["p99"],
                    "pages": page["pages"],
                    "rss MB": rss_mb(reader.proc.pid),
                }
            )
    return ids, rows


def growth(rows: list[dict[str, Any]], key: str) -> float:
    """The p99 at the deepest depth over the shallowest (first reader's rows)."""
    first = [r for r in rows if r.get("node", 1) == 1]
    return round(first[-1][key] / first[0][key], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default="100,1000,10000")
    parser.add_argument("--gets", type=int, default=500, help="job GETs per depth (500)")
    parser.add_argument("--limit", type=int, default=100, help="page size of the walk (100)")
    parser.add_argument("--max-pages", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    ensure_echo_plugin()
    home = Path(tempfile.mkdtemp(prefix="kiapi-queue-depth-"))
    env = {"KIAPI_PLUGINS": "echo", "KIAPI_WORKERS": "1", "KIAPI_MAX_QUEUE": str(max(depths) + 10)}
    server = start_server(home, env)
    try:
        with server.client() as c:
            blocker = hold_slot(c)
            ids, rows = fill_and_measure(
                server, [server], depths, args.gets, args.limit, args.max_pages
            )
            c.delete(f"/v1/jobs/{blocker}")
            started = time.perf_counter()
            wait_for(
                lambda: c.get("/health").json()["queue"] == {"waiting": 0, "running": 0},
                timeout=3600,
                interval=0.2,
            )
            drain_s = time.perf_counter() - started
    finally:
        server.stop()
    first, last = rows[0], rows[-1]
    result = {
        "rows": rows,
        "drain_s": round(drain_s, 2),
        "drain_jobs_per_s": round(len(ids) / drain_s, 1),
        "get_p99_growth": growth(rows, "get p99"),
        "list_p99_growth": growth(rows, "list p99"),
        "page_limit": args.limit,
        "target": "at 10,000: job GET p99 <= 5 ms, list p99 <= 20 ms, no growth with depth",
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"one slot held busy; {SUBMITTERS} submitters; pages of {args.limit}, status=queued")
    print(table(rows, list(rows[0])))
    print(
        f"p99 growth {last['depth']} vs {first['depth']}: get {result['get_p99_growth']}x,"
        f" list {result['list_p99_growth']}x"
    )
    print(f"drain of {len(ids)} jobs: {drain_s:.1f} s ({result['drain_jobs_per_s']} jobs/s)")


if __name__ == "__main__":
    main()
