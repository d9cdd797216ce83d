"""Scale-out: echo throughput with 1 vs 2 Celery workers, and what the Celery backend adds to
dispatch latency compared with the embedded one. Everything real and on this machine: a
throwaway redis-server, `kiapi serve` processes and `kiapi worker` processes.

- latency: sequential sync echo jobs (1 step, no delay) on an embedded server and on a celery
  API node with one worker: request round trip, and queue wait (job ``started_at - created_at``:
  the dispatch path from the store to a running handler).
- throughput: a burst of async echo jobs (``--steps`` steps of ``--delay`` s each: the handler
  sleeps, as a model run that leaves the CPU to its accelerator would) drained by the embedded
  server (1 slot), by 1 worker and by 2 workers; jobs/s and the 2-vs-1 ratio.

Bounded: about 30 s with the defaults on 2 cores.

    uv run python bench/scaleout.py [--jobs 30] [--steps 4] [--delay 0.05] [--requests 100] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from _harness import ensure_echo_plugin, summary_ms, table

from kiapi_core.testing import LiveServer, start_server, wait_for
from kiapi_core.testing.redis import LiveWorker, RedisServer, start_redis, start_worker

ROOT = Path(__file__).resolve().parent.parent
ECHO = "/v1/text/echo/run"


def latency(server: LiveServer, requests: int) -> dict[str, Any]:
    round_trip: list[float] = []
    queue_wait: list[float] = []
    body = {"text": "x", "steps": 1, "delay_s": 0}
    with server.client() as c:
        for _ in range(5):  # warm: connections, the model load
            c.post(ECHO, json=body, headers={"Accept": "application/json"})
        for _ in range(requests):
            started = time.perf_counter()
            job = c.post(ECHO, json=body, headers={"Accept": "application/json"}).json()
            round_trip.append(time.perf_counter() - started)
            assert job["status"] == "succeeded", job
            queue_wait.append(job["started_at"] - job["created_at"])
    return {"round_trip": summary_ms(round_trip), "queue_wait": summary_ms(queue_wait)}


def throughput(server: LiveServer, jobs: int, steps: int, delay: float) -> dict[str, Any]:
    body = {"text": "x", "steps": steps, "delay_s": delay, "mode": "async"}
    with server.client() as c:
        started = time.perf_counter()
        ids = [c.post(ECHO, json=body).json()["job_id"] for _ in range(jobs)]

        def all_done() -> bool:
            page = c.get("/v1/jobs", params={"status": "succeeded", "limit": 200}).json()
            return len({j["id"] for j in page["jobs"]} & set(ids)) == len(ids)

        wait_for(all_done, timeout=600, interval=0.05)
        elapsed = time.perf_counter() - started
    return {"jobs": jobs, "seconds": elapsed, "jobs_per_s": jobs / elapsed}


@contextmanager
def cluster(root: Path, redis: RedisServer, workers: int) -> Iterator[LiveServer]:
    env = {
        "KIAPI_BACKEND": "celery",
        "KIAPI_REDIS_URL": redis.url,
        "KIAPI_REDIS_PREFIX": f"bench{workers}",
        "KIAPI_FILES_DIR": str(root / f"shared-{workers}"),
        "KIAPI_PLUGINS": "echo",
        "KIAPI_MAX_QUEUE": "1000",
    }
    api = start_server(root / f"api-{workers}", env)
    started: list[LiveWorker] = []
    try:
        for n in range(workers):
            started.append(start_worker(root / f"worker-{workers}-{n}", f"w{n}", env))
        yield api
    finally:
        for w in started:
            w.stop()
        api.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ensure_echo_plugin()
    root = Path(tempfile.mkdtemp(prefix="kiapi-bench-scaleout-"))
    redis = start_redis(root / "redis")
    results: dict[str, Any] = {}
    began = time.perf_counter()
    try:
        embedded = start_server(
            root / "embedded", {"KIAPI_PLUGINS": "echo", "KIAPI_MAX_QUEUE": "1000"}
        )
        try:
            results["embedded"] = {
                "latency": latency(embedded, args.requests),
                "throughput": throughput(embedded, args.jobs, args.steps, args.delay),
            }
        finally:
            embedded.stop()
        with cluster(root, redis, 1) as api:
            results["celery_1"] = {
                "latency": latency(api, args.requests),
                "throughput": throughput(api, args.jobs, args.steps, args.delay),
            }
        with cluster(root, redis, 2) as api:
            results["celery_2"] = {
                "throughput": throughput(api, args.jobs, args.steps, args.delay),
            }
    finally:
        redis.stop()
    one = results["celery_1"]["throughput"]["jobs_per_s"]
    two = results["celery_2"]["throughput"]["jobs_per_s"]
    added = {
        k: results["celery_1"]["latency"][k]["p50"] - results["embedded"]["latency"][k]["p50"]
        for k in ("round_trip", "queue_wait")
    }
    results["ratio_2_vs_1_workers"] = two / one
    results["added_dispatch_ms_p50"] = added
    results["job_work_s"] = args.steps * args.delay
    results["runtime_s"] = time.perf_counter() - began
    if args.json:
        print(json.dumps(results, indent=2))
        return

    print(
        f"echo jobs of {args.steps} x {args.delay:g} s; {args.requests} sync requests; "
        f"all processes on this machine ({os.cpu_count()} cores)\n"
    )
    rows = []
    for name, label in (
        ("embedded", "embedded (SQLite, in-process)"),
        ("celery_1", "celery, 1 worker"),
    ):
        lat = results[name]["latency"]
        rows.append(
            {
                "backend": label,
                "round trip p50 ms": lat["round_trip"]["p50"],
                "round trip p99 ms": lat["round_trip"]["p99"],
                "queue wait p50 ms": lat["queue_wait"]["p50"],
                "queue wait p99 ms": lat["queue_wait"]["p99"],
            }
        )
    print(table(rows, list(rows[0])))
    print(
        f"\nadded by celery (p50): round trip {added['round_trip']:+.2f} ms,"
        f" queue wait {added['queue_wait']:+.2f} ms\n"
    )
    rows = [
        {"backend": label, "jobs": t["jobs"], "seconds": t["seconds"], "jobs/s": t["jobs_per_s"]}
        for label, t in (
            ("embedded, 1 slot", results["embedded"]["throughput"]),
            ("celery, 1 worker", results["celery_1"]["throughput"]),
            ("celery, 2 workers", results["celery_2"]["throughput"]),
        )
    ]
    print(table(rows, list(rows[0])))
    print(
        f"\n2 workers vs 1: x{results['ratio_2_vs_1_workers']:.2f} throughput"
        f"  (bench ran {results['runtime_s']:.0f} s)"
    )


if __name__ == "__main__":
    main()
