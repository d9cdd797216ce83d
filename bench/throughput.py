"""Requests/s and p99 of GET /v1/jobs/{id} and GET /v1/files/{id}/download (1 MB) under wrk.

The server runs as the README runs it (`kiapi serve`, embedded defaults); wrk (Debian `wrk`)
drives 32 connections for 10 s per route from a second process, fresh and again after 50
jobs, so a decline as the store grows would show. Target: >= 6,000 req/s on the job route.

    uv run python bench/throughput.py [--duration 10] [--connections 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from _harness import ensure_echo_plugin, rss_mb, table

from kiapi_core.testing import start_server, wait_for

ROOT = Path(__file__).resolve().parent.parent


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
            for phase in ("fresh", f"after {args.jobs} jobs"):
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
    finally:
        server.stop()
    job_rows = [r for r in rows if r["route"].startswith("GET /v1/jobs")]
    result = {
        "rows": rows,
        "job_route_after_vs_fresh": job_rows[1]["rps"] / job_rows[0]["rps"],
        "target": "job route >= 6000 req/s, no decline after many jobs",
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"wrk -t2 -c{args.connections} -d{args.duration}s on loopback; server: kiapi serve (embedded)"
    )
    print(table(rows, ["phase", "route", "rps", "p50_ms", "p99_ms", "non_2xx", "server_rss_mb"]))
    print(f"job route, after/fresh: {result['job_route_after_vs_fresh']:.3f}")


if __name__ == "__main__":
    main()
