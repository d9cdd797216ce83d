"""Requests/s and p99 of GET /v1/jobs/{id} and GET /v1/files/{id}/download (1 MB) under wrk.

The server runs as the README runs it (`kiapi serve`, embedded defaults); wrk (Debian `wrk`)
drives 32 connections for 10 s per route from a second process, fresh and again after 50
jobs, so a decline as the store grows would show. Target: >= 6,000 req/s on the job route.

Then, side by side in interleaved rounds (--rounds x --round-s), the same job route against a
bare Starlette app under the same uvicorn (httptools, uvloop, no access log) serving the very
bytes and content type kiapi answers it with: the floor an ASGI app on this machine can reach.
Target: kiapi >= 0.75x bare.

    uv run python bench/throughput.py [--duration 10] [--connections 32] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
import httpx
from _harness import ensure_echo_plugin, rss_mb, table

from kiapi_core.testing import free_port, start_server, wait_for

ROOT = Path(__file__).resolve().parent.parent


# The floor: one route answering fixed bytes, under uvicorn as `kiapi serve` runs it.
BARE_APP = """
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

body = open(sys.argv[2], "rb").read()

async def job(request):
    return Response(body, media_type="application/json")

app = Starlette(routes=[Route("/v1/jobs/{job_id}", job)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False, http="httptools", loop="uvloop")
"""


def bare_server(body: bytes, home: Path) -> tuple[subprocess.Popen[bytes], str]:
    blob = home / "bare-body.json"
    blob.write_bytes(body)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE_APP, str(port), str(blob)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/v1/jobs/x", timeout=1).content == body
        except httpx.HTTPError:
            return False

    wait_for(up)
    return proc, url


def vs_bare(
    urls: dict[str, str], bare_url: str, rounds: int, seconds: int, connections: int
) -> dict[str, Any]:
    """Interleaved rounds, each kiapi then bare, so a burst of load lands on all alike."""
    out: dict[str, list[float]] = {name: [] for name in [*urls, "bare"]}
    ratios: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(rounds):
        for name, url in urls.items():
            out[name].append(wrk(url, seconds, connections)["rps"])
        out["bare"].append(wrk(bare_url, seconds, connections)["rps"])
        for name in urls:
            ratios[name].append(out[name][-1] / out["bare"][-1])
    return {
        **{f"{name}_rps": [round(v) for v in out[name]] for name in out},
        **{f"{name}_ratios": [round(r, 3) for r in ratios[name]] for name in urls},
        **{f"{name}_ratio_median": round(statistics.median(ratios[name]), 3) for name in urls},
        "ratios": [round(r, 3) for r in ratios["kiapi"]],
        "ratio_median": round(statistics.median(ratios["kiapi"]), 3),
        "round_s": seconds,
        "target": "kiapi >= 0.75x bare",
    }


def first_job(server: Any) -> str:
    with server.client() as c:
        job: str = c.post(
            "/v1/text/echo/run",
            json={"text": "hi", "steps": 1, "delay_s": 0},
            headers={"Accept": "application/json"},
        ).json()["id"]
    return job


def wrk(url: str, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="kiapi/bare rounds (3)")
    parser.add_argument("--round-s", type=int, default=5, help="seconds per round (5)")
    parser.add_argument("--skip-phases", action="store_true", help="only the bare comparison")
    parser.add_argument(
        "--before",
        help="Also serve the kiapi_core of this checkout (`git archive <rev> kiapi_core`"
        " unpacked) in the interleaved rounds against bare, and print its ratios too.",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    ensure_echo_plugin()
    home = Path(tempfile.mkdtemp(prefix="kiapi-throughput-"))
    server = start_server(home, {"KIAPI_PLUGINS": "echo"})
    rows: list[dict[str, Any]] = []
    try:
        with server.client() as c:
            job = c.post(
                "/v1/text/echo/run",
                json={"text": "hi", "steps": 1, "delay_s": 0},
                headers={"Accept": "application/json"},
            ).json()["id"]
            blob = os.urandom(1024 * 1024)
            file_id = c.post("/v1/files", files={"file": ("one-mb.bin", blob)}).json()["id"]
            routes = {
                "GET /v1/jobs/{id}": f"{server.url}/v1/jobs/{job}",
                "GET /v1/files/{id}/download (1 MB)": f"{server.url}/v1/files/{file_id}/download",
            }
            job_bytes = c.get(f"/v1/jobs/{job}").content
            phases = () if args.skip_phases else ("fresh", f"after {args.jobs} jobs")
            for phase in phases:
                if phase != "fresh":
                    for i in range(args.jobs):
                        c.post(
                            "/v1/text/echo/run", json={"text": f"job {i}", "steps": 2, "delay_s": 0}
                        )
                    # Measure a quiet server: every job finished, as in the fresh phase.
                    wait_for(
                        lambda: c.get("/health").json()["queue"] == {"waiting": 0, "running": 0}
                    )
                for name, url in routes.items():
                    r = wrk(url, args.duration, args.connections)
                    rows.append(
                        {
                            "phase": phase,
                            "route": name,
                            **r,
                            "server_rss_mb": rss_mb(server.proc.pid),
                        }
                    )
            bare, bare_url = bare_server(job_bytes, home)
            before = None
            urls = {"kiapi": routes["GET /v1/jobs/{id}"]}
            try:
                if args.before:
                    env = {"KIAPI_PLUGINS": "echo", "PYTHONPATH": str(Path(args.before).resolve())}
                    # -m puts the working directory (this checkout) ahead of PYTHONPATH.
                    env["PYTHONSAFEPATH"] = "1"
                    before = start_server(home / "before", env)
                    urls = {"before": f"{before.url}/v1/jobs/{first_job(before)}", **urls}
                bare_cmp = vs_bare(
                    urls, f"{bare_url}/v1/jobs/{job}", args.rounds, args.round_s, args.connections
                )
            finally:
                bare.terminate()
                bare.wait(10)
                if before is not None:
                    before.stop()
    finally:
        server.stop()
    job_rows = [r for r in rows if r["route"].startswith("GET /v1/jobs")]
    result = {
        "rows": rows,
        "vs_bare": bare_cmp,
        "job_route_after_vs_fresh": job_rows[1]["rps"] / job_rows[0]["rps"] if job_rows else None,
        "target": "job route >= 6000 req/s, no decline after many jobs",
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"wrk -t2 -c{args.connections} -d{args.duration}s on loopback; server: kiapi serve (embedded)"
    )
    if rows:
        print(
            table(rows, ["phase", "route", "rps", "p50_ms", "p99_ms", "non_2xx", "server_rss_mb"])
        )
    if job_rows:
        print(f"job route, after/fresh: {result['job_route_after_vs_fresh']:.3f}")
    for name in ("before", "kiapi") if args.before else ("kiapi",):
        print(
            f"GET /v1/jobs/{{id}} vs bare Starlette, same bytes, {args.rounds} interleaved"
            f" {args.round_s} s rounds: {name} {bare_cmp[f'{name}_rps']} vs bare"
            f" {bare_cmp['bare_rps']} req/s, ratios {bare_cmp[f'{name}_ratios']}, median"
            f" {bare_cmp[f'{name}_ratio_median']} (target >= 0.75)"
        )


if __name__ == "__main__":
    main()
