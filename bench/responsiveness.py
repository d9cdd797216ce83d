"""Does the control plane stay responsive while a generation keeps the worker busy?

Starts `kiapi serve` with ideogram4 on the tiny checkpoint, then from a second process polls
GET /v1/jobs/{id}, GET /health and a small file download at ~20 requests/s, first idle and then
while a 512x512 V4_DEFAULT_20 generation runs. Prints p50/p99/max per route for both, their
ratios, and the job's progress timeline (to show progress stays honest through the decode).

    uv run python bench/responsiveness.py [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

sys.path.insert(0, __import__("os").path.dirname(__file__))
from _harness import ideogram_server, rss_mb, summary_ms, table

PROBE = r"""
import json, sys, time, httpx
url, job, file_id, seconds, stop_on_done = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5] == "1"
routes = {"job": f"/v1/jobs/{job}", "health": "/health", "download": f"/v1/files/{file_id}/download"}
lat = {k: [] for k in routes}
timeline = []
t0 = time.perf_counter()
with httpx.Client(base_url=url, timeout=30) as c:
    i = 0
    while time.perf_counter() - t0 < seconds:
        name = list(routes)[i % 3]
        start = time.perf_counter()
        r = c.get(routes[name])
        lat[name].append(time.perf_counter() - start)
        if name == "job" and job != "none":
            j = r.json()
            timeline.append((round(time.perf_counter() - t0, 2), j["status"], j["progress"], j["progress_label"]))
            if stop_on_done and j["status"] in ("succeeded", "failed", "canceled"):
                break
        i += 1
        time.sleep(max(0.0, t0 + i / 20 - time.perf_counter()))
print(json.dumps({"lat": lat, "timeline": timeline}))
"""


def probe(url: str, job: str, file_id: str, seconds: float, stop_on_done: bool) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE,
            url,
            job,
            file_id,
            str(seconds),
            "1" if stop_on_done else "0",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--preset", default="V4_DEFAULT_20")
    parser.add_argument("--idle-seconds", type=float, default=8)
    args = parser.parse_args()

    server = ideogram_server()
    try:
        with server.client(timeout=600) as c:
            warm = c.post(
                "/v1/image/ideogram4/generate",
                json={
                    "prompt": "warm up",
                    "width": 256,
                    "height": 256,
                    "preset": "V4_TURBO_12",
                    "seed": 1,
                },
            )
            warm.raise_for_status()
            small = c.post("/v1/files", files={"file": ("small.bin", b"x" * 16384)}).json()["id"]
            idle = probe(server.url, "none", small, args.idle_seconds, False)
            job = c.post(
                "/v1/image/ideogram4/generate",
                json={
                    "prompt": "a red poster that says HELLO",
                    "width": args.size,
                    "height": args.size,
                    "preset": args.preset,
                    "seed": 2,
                    "mode": "async",
                },
            ).json()["job_id"]
            busy = probe(server.url, job, small, 900, True)
            final = c.get(f"/v1/jobs/{job}").json()
            worker = c.get("/health").json()["worker"]
            pids = {"api": server.proc.pid, "worker": worker.get("pid")}
            memory = {
                name: {"rss_mb": round(rss_mb(pid), 1), "peak_mb": round(rss_mb(pid, "VmHWM"), 1)}
                for name, pid in pids.items()
                if pid is not None
            }
    finally:
        server.stop()

    rows = []
    for name in ("job", "health", "download"):
        i = summary_ms(idle["lat"][name]) if idle["lat"][name] else None
        b = summary_ms(busy["lat"][name])
        rows.append(
            {
                "route": name,
                "idle p50": i["p50"] if i else None,
                "idle p99": i["p99"] if i else None,
                "busy n": b["n"],
                "busy p50": b["p50"],
                "busy p99": b["p99"],
                "busy max": b["max"],
                "p99 busy/idle": b["p99"] / i["p99"] if i else None,
            }
        )
    timeline = busy["timeline"]
    early_one = [t for t in timeline if t[2] == 1.0 and t[1] != "succeeded"]
    decode = [t for t in timeline if t[3] == "decoding"]
    result = {
        "generation": {
            "size": args.size,
            "preset": args.preset,
            "status": final["status"],
            "run_s": round(final["finished_at"] - final["started_at"], 2),
            "model_s": final["result"]["timings"]["total_s"] if final["result"] else None,
        },
        "worker_mode": worker["mode"],
        "memory_after": memory,
        "latency_ms": rows,
        "progress_hit_1_before_done": bool(early_one),
        "decode_started_at_progress": decode[0][2] if decode else None,
        "decode_seconds_observed": round(decode[-1][0] - decode[0][0], 2) if decode else None,
        "timeline": timeline[:: max(1, len(timeline) // 40)] + timeline[-1:],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    g = result["generation"]
    print(
        f"generation {g['size']}x{g['size']} {g['preset']}: {g['status']} in {g['run_s']}s (model {g['model_s']}s)"
    )
    print(
        f"jobs ran in: {result['worker_mode']}; memory after (MB): "
        + ", ".join(f"{k} {v['rss_mb']} (peak {v['peak_mb']})" for k, v in memory.items())
    )
    print(
        table(
            rows,
            [
                "route",
                "idle p50",
                "idle p99",
                "busy n",
                "busy p50",
                "busy p99",
                "busy max",
                "p99 busy/idle",
            ],
        )
    )
    print(f"progress reached 1.0 before the job succeeded: {result['progress_hit_1_before_done']}")
    print(
        f"decode began at progress {result['decode_started_at_progress']} and lasted ~{result['decode_seconds_observed']}s"
    )
    print("timeline (s, status, progress, label):")
    for t in result["timeline"]:
        print(f"  {t[0]:7.2f}  {t[1]:9}  {t[2]!s:6}  {t[3]}")


if __name__ == "__main__":
    main()
