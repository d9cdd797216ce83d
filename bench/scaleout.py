"""Scale-out: echo throughput with 1 vs 2 Celery workers, and what the Celery backend adds to
dispatch latency compared with the embedded one. Everything real and on this machine: a
throwaway redis-server, `kiapi serve` processes and `kiapi worker` processes.

- latency: sequential sync echo jobs (1 step, no delay) on an embedded server and on a celery
  API node with one worker: request round trip, and queue wait (job ``started_at - created_at``:
  the dispatch path from the store to a running handler).
- throughput: a burst of async echo jobs (``--steps`` steps of ``--delay`` s each: the handler
  sleeps, as a model run that leaves the CPU to its accelerator would) drained by the embedded
  server (1 slot), by 1 worker and by 2 workers; jobs/s and the 2-vs-1 ratio.

- residency-aware routing (issue #19.7): two workers, two resident models (kiapi-pair's fake
  ``pair-a`` / ``pair-b``, loaded ahead with ``POST /v1/models/pair/<name>/load``), then
  ``--residency-jobs`` mixed jobs; model loads per worker while they run, with routing on
  (KIAPI_ROUTE_BY_RESIDENCY, the default) and off (each job type's shared queue, as before),
  with a memory budget that fits both models and one that fits one.

- fan-out and depth with a second API node (issue #19.6): two `kiapi serve` nodes on one
  Redis. N SSE followers (``--fanout-sizes``, split over the two nodes) of two echo jobs
  reporting at 20 Hz on one `kiapi worker`: bench/fanout.py's delivery lag, `/health` and
  `GET /v1/jobs/{id}` p50/p99, RSS and fds per node (node 2 sees every change through Redis
  only), an embedded server measured beside each size. Then 10,000 jobs queued behind one busy worker slot: bench/queue_depth.py's job GET
  and list p99 on both nodes at ``--depths`` side by side.

Bounded: about 6 minutes with the defaults on 2 cores (the residency section starts four
small clusters, `--residency-jobs 0` skips it; `--fanout-sizes ''` and `--depths ''` skip the
two-node sections, about 4 minutes together).

    uv run python bench/scaleout.py [--jobs 30] [--steps 4] [--delay 0.05] [--requests 100]
        [--residency-jobs 40] [--fanout-sizes 100,1000,2000] [--fanout-seconds 6]
        [--no-fanout-embedded] [--depths 100,1000,10000] [--depth-gets 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from _harness import ensure_echo_plugin, summary_ms, table
from fanout import Node, run_size
from queue_depth import fill_and_measure, growth, hold_slot

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


@contextmanager
def two_nodes(
    root: Path, redis: RedisServer, tag: str, extra: dict[str, str], *worker_args: str
) -> Iterator[list[LiveServer]]:
    """Two API nodes and one `kiapi worker` sharing a Redis prefix and a files directory."""
    env = {
        "KIAPI_BACKEND": "celery",
        "KIAPI_REDIS_URL": redis.url,
        "KIAPI_REDIS_PREFIX": tag,
        "KIAPI_FILES_DIR": str(root / f"shared-{tag}"),
        "KIAPI_PLUGINS": "echo",
        "KIAPI_LOG_LEVEL": "warning",
        **extra,
    }
    apis: list[LiveServer] = []
    worker: LiveWorker | None = None
    try:
        apis = [start_server(root / f"api{n}-{tag}", env) for n in (1, 2)]
        worker = start_worker(root / f"worker-{tag}", f"w-{tag}", env, *worker_args)
        yield apis
    finally:
        if worker:
            worker.stop()
        for api in apis:
            api.stop()


def fanout(root: Path, redis: RedisServer, sizes: list[int], seconds: float, embedded: bool) -> Any:
    """bench/fanout.py's figures per size, followers split over two API nodes; with
    ``embedded``, one embedded server (2 slots) at the same size just before, side by side."""
    rows = []
    extra = {"KIAPI_MAX_CONNECTIONS": "5000", "KIAPI_MAX_QUEUE": "100"}
    for n in sizes:
        if embedded:
            env = {**extra, "KIAPI_PLUGINS": "echo", "KIAPI_WORKERS": "2"}
            server = start_server(root / f"fan-embedded-{n}", env)
            try:
                (row,) = run_size([Node(server.url, server.proc.pid)], n, 2, seconds)
                rows.append({**row, "backend": "embedded", "node": "-"})
            finally:
                server.stop()
        with two_nodes(root, redis, f"fan{n}", extra, "--concurrency", "2") as apis:
            got = run_size([Node(a.url, a.proc.pid) for a in apis], n, 2, seconds)
            rows += [{**r, "backend": "celery"} for r in got]
    return rows


def depth(root: Path, redis: RedisServer, depths: list[int], gets: int) -> Any:
    """bench/queue_depth.py's job GET and list p99, read on both API nodes, per depth."""
    extra = {"KIAPI_MAX_QUEUE": str(max(depths) + 10)}
    with two_nodes(root, redis, "depth", extra) as apis, apis[0].client() as c:
        hold_slot(c)
        _, rows = fill_and_measure(apis[0], apis, depths, gets, 100, 100)
    return {
        "rows": rows,
        "get_p99_growth": growth(rows, "get p99"),
        "list_p99_growth": growth(rows, "list p99"),
    }


PAIR = "/v1/text/pair/run"


def ensure_pair_plugin() -> None:
    from importlib import metadata

    try:
        metadata.distribution("kiapi-pair")
    except metadata.PackageNotFoundError:
        plugin = str(ROOT / "tests" / "plugins" / "pair")
        subprocess.run(
            ["uv", "pip", "install", "-q", "--python", sys.executable, plugin], check=True
        )


def _loads(c: Any, names: dict[str, str]) -> dict[str, dict[str, int]]:
    rows = c.get("/health").json()["worker"]["workers"]
    return {names[w["node"]]: dict(w["loads"]) for w in rows}


def residency(root: Path, redis: RedisServer, jobs: int, route: bool, budget_gb: float) -> Any:
    """Loads per worker while ``jobs`` mixed pair jobs run after both models were loaded."""
    tag = f"res-{int(route)}-{budget_gb:g}"
    env = {
        "KIAPI_BACKEND": "celery",
        "KIAPI_REDIS_URL": redis.url,
        "KIAPI_REDIS_PREFIX": tag,
        "KIAPI_FILES_DIR": str(root / f"shared-{tag}"),
        "KIAPI_PLUGINS": "pair",
        "KIAPI_MAX_QUEUE": "1000",
        "KIAPI_ROUTE_BY_RESIDENCY": str(route).lower(),
        "KIAPI_MEMORY_LIMIT_GB": str(budget_gb),
        "KIAPI_PAIR_MEMORY_GB": "1",
        "KIAPI_PAIR_LOAD_S": "0.3",
    }
    api = start_server(root / f"api-{tag}", env)
    workers: list[LiveWorker] = []
    try:
        workers = [start_worker(root / f"w{n}-{tag}", f"w{n}{tag}", env) for n in range(2)]
        names = {w.name: f"w{n}" for n, w in enumerate(workers)}
        with api.client() as c:
            wait_for(lambda: len(c.get("/health").json()["worker"]["workers"]) == 2)
            for model in ("pair-a", "pair-b"):
                job_id = c.post(f"/v1/models/pair/{model}/load").json()["id"]
                wait_for(lambda j=job_id: c.get(f"/v1/jobs/{j}").json()["status"] == "succeeded")
                wait_for(
                    lambda m=model: any(
                        r["id"] == f"pair/{m}" and r["resident"]
                        for r in c.get("/v1/models").json()["data"]
                    )
                )
            before = _loads(c, names)
            started = time.perf_counter()
            body = {"mode": "async", "steps": 2, "delay_s": 0.02}
            ids = [
                c.post(PAIR, json={**body, "model": "pair-a" if i % 3 else "pair-b"}).json()[
                    "job_id"
                ]
                for i in range(jobs)
            ]
            done = [
                wait_for(
                    lambda j=job_id: (
                        (r := c.get(f"/v1/jobs/{j}").json())["status"] == "succeeded" and r
                    ),
                    timeout=300,
                )
                for job_id in ids
            ]
            seconds = time.perf_counter() - started
            after = _loads(c, names)
    finally:
        for w in workers:
            w.stop()
        api.stop()
    extra = {w: sum(after[w].values()) - sum(before.get(w, {}).values()) for w in sorted(after)}
    return {
        "routing": route,
        "budget_gb": budget_gb,
        "resident_before": {w: sorted(v) for w, v in sorted(before.items())},
        "extra_loads": extra,
        "jobs_that_loaded": sum(1 for j in done if j["result"]["loaded"]),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--residency-jobs", type=int, default=40)
    parser.add_argument(
        "--fanout-sizes", default="100,1000,2000", help="SSE followers over two nodes ('' skips)"
    )
    parser.add_argument("--fanout-seconds", type=float, default=6.0)
    parser.add_argument(
        "--no-fanout-embedded",
        action="store_true",
        help="skip the embedded server measured beside each fan-out size",
    )
    parser.add_argument("--depths", default="100,1000,10000", help="queue depths ('' skips)")
    parser.add_argument("--depth-gets", type=int, default=300, help="job GETs per depth, node")
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
        if args.residency_jobs:
            ensure_pair_plugin()
            # 1 GB each (estimated): a 2.5 GB budget holds both, a 1.5 GB budget one.
            results["residency"] = [
                residency(root, redis, args.residency_jobs, route, budget)
                for budget in (2.5, 1.5)
                for route in (False, True)
            ]
        if args.fanout_sizes:
            sizes = [int(n) for n in args.fanout_sizes.split(",")]
            results["fanout_2_nodes"] = fanout(
                root, redis, sizes, args.fanout_seconds, not args.no_fanout_embedded
            )
        if args.depths:
            depths = [int(d) for d in args.depths.split(",")]
            results["depth_2_nodes"] = depth(root, redis, depths, args.depth_gets)
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
    if results.get("residency"):
        print(
            f"\nresidency-aware routing: 2 workers, pair-a and pair-b loaded ahead, then"
            f" {args.residency_jobs} mixed jobs (2/3 pair-a)\n"
        )
        rows = [
            {
                "routing": "by residency" if r["routing"] else "shared queue (before)",
                "budget": f"{r['budget_gb']:g} GB ({'both' if r['budget_gb'] > 2 else 'one'})",
                "resident before": "; ".join(
                    f"{w}: {','.join(m.split('/')[1] for m in v) or '-'}"
                    for w, v in r["resident_before"].items()
                ),
                "extra loads": ", ".join(f"{w}: {n}" for w, n in r["extra_loads"].items()),
                "jobs that loaded": r["jobs_that_loaded"],
                "seconds": r["seconds"],
            }
            for r in results["residency"]
        ]
        print(table(rows, list(rows[0])))
    if results.get("fanout_2_nodes"):
        print(
            "\nSSE fan-out, celery: 2 API nodes, 1 worker running 2 echo jobs at 20 Hz;"
            " followers split over the nodes (jobs submitted to node 1)\n"
        )
        cols = ["backend", "followers", "node", "on node", "lag p50 ms", "lag p99 ms", "lag max ms"]
        cols += ["to store p99 ms", "to store max ms", "opening lag p99 ms"]
        cols += ["health p50 ms", "health p99 ms", "job p50 ms", "job p99 ms", "rss MB", "fds"]
        cols += ["cpu ms/1k events", "machine busy %", "ended"]
        print(table(results["fanout_2_nodes"], cols))
    if results.get("depth_2_nodes"):
        d = results["depth_2_nodes"]
        print(
            "\nqueue depth, celery: 1 worker slot held busy, queued through node 1, read on both\n"
        )
        print(table(d["rows"], list(d["rows"][0])))
        print(
            f"p99 growth (node 1, deepest vs shallowest): get {d['get_p99_growth']}x,"
            f" list {d['list_p99_growth']}x"
        )


if __name__ == "__main__":
    main()
