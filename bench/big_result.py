"""A job with a big result must not stall the next one (issue 13, item 8).

Submits an echo job whose result carries ``--pad-mb`` MB, then a small job right behind it,
and reports how long after the big job ended the small one started, the wall time until it
succeeded, /health's worst latency meanwhile, and the size of ``GET /v1/jobs``. Needs the
echo test plugin (tests/plugins/echo; the test session installs it).

uv run python bench/big_result.py [--pad-mb 60] [--max-result-bytes N] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kiapi_core.testing import start_server

ECHO = "/v1/text/echo/run"


def measure(pad_mb: float, env: dict[str, str]) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="kiapi-bench-big-"))
    server = start_server(home, {"KIAPI_PLUGINS": "echo", **env})
    worst = [0.0]
    stop = threading.Event()
    try:
        with server.client(timeout=300) as c:
            c.post(ECHO, json={"text": "warm", "steps": 1}).raise_for_status()

            def probe() -> None:
                with server.client(timeout=300) as p:
                    while not stop.is_set():
                        t = time.perf_counter()
                        p.get("/health").raise_for_status()
                        worst[0] = max(worst[0], time.perf_counter() - t)
                        time.sleep(0.05)

            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            started = time.perf_counter()
            big = c.post(
                ECHO,
                json={"text": "big", "steps": 1, "mode": "async", "pad_bytes": int(pad_mb * 1e6)},
            ).json()["job_id"]
            small = c.post(ECHO, json={"text": "next", "steps": 1, "mode": "async"}).json()[
                "job_id"
            ]
            while (s := c.get(f"/v1/jobs/{small}").json())["status"] not in (
                "succeeded",
                "failed",
            ):
                time.sleep(0.05)
            wall = time.perf_counter() - started
            stop.set()
            prober.join()
            b = c.get(f"/v1/jobs/{big}").json()
            listing = c.get("/v1/jobs").content
            return {
                "pad_mb": pad_mb,
                "big_status": b["status"],
                "big_error": (b["error"] or "")[:120],
                "next_started_after_big_ended_s": round(s["started_at"] - b["finished_at"], 3),
                "next_done_wall_s": round(wall, 3),
                "health_worst_ms": round(worst[0] * 1000, 1),
                "list_bytes": len(listing),
            }
    finally:
        stop.set()
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pad-mb", type=float, default=60)
    ap.add_argument("--max-result-bytes", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    env = {}
    if args.max_result_bytes is not None:
        env["KIAPI_MAX_RESULT_BYTES"] = str(args.max_result_bytes)
    out = measure(args.pad_mb, env)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
