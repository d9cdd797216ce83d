"""Does one client sending the largest accepted JSON body stall everyone else?

Starts `kiapi serve` (echo plugin), then for each body shape sends the largest body the server
accepts (KIAPI_MAX_BODY_BYTES) over and over from one client, while a second process polls
GET /health at ~50 requests/s with one reused connection. Prints /health p50/p99/max during
those parses next to /health idle, their ratio, the time per big request, and the server's
peak RSS (the body shapes are the costly ones: many values, many objects, long numbers).

    uv run python bench/big_body.py [--seconds 6] [--bytes N] [--shapes zeros,objects] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, __import__("os").path.dirname(__file__))
from _harness import ensure_echo_plugin, rss_mb, summary_ms, table

from kiapi_core.settings import Settings
from kiapi_core.testing import start_server

ECHO = "/v1/text/echo/run"
JSON = {"content-type": "application/json"}

PROBE = r"""
import json, sys, time, httpx
url, seconds = sys.argv[1], float(sys.argv[2])
samples = []
with httpx.Client(base_url=url, timeout=120) as c:
    c.get("/health")
    print("ready", flush=True)
    t0 = time.time()
    i = 0
    while time.time() - t0 < seconds:
        start = time.time()
        c.get("/health")
        samples.append((start, time.time() - start))
        i += 1
        time.sleep(max(0.0, t0 + i / 50 - time.time()))
print(json.dumps(samples))
"""


def body(shape: str, size: int, max_values: int) -> bytes:
    """A JSON object of at most ``size`` bytes whose ``junk`` field fills it with ``shape``."""
    head, tail = b'{"text": "x", "junk": [', b"]}"
    if shape == "capped":
        # Just under KIAPI_MAX_JSON_VALUES, so every value is built and checked; a string
        # fills the rest of the size.
        values = b"0," * (max_values - 8) + b"0"
        pad = max(0, size - len(head) - len(values) - 20)
        return head + values + b'], "pad": "' + b"x" * pad + b'"}'
    unit = {
        "zeros": b"0,",  # the most values per byte: the 31 s body
        "objects": b"{},",  # the most objects per byte: the 1.39 GB body
        "strings": b'"a,b",',  # separators inside strings: the exact value count
        "bigints": b"7" * 4300 + b",",  # the longest numbers Python parses (quadratic)
    }[shape]
    count = max(1, (size - len(head) - len(tail)) // len(unit))
    return head + (unit * count)[:-1] + tail


def probe(url: str, seconds: float) -> tuple[subprocess.Popen[str], Any]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE, url, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc, proc.stdout


def idle(url: str, seconds: float) -> list[float]:
    proc, out = probe(url, seconds)
    samples = json.loads(out.read())
    proc.wait()
    return [lat for _, lat in samples]


def busy(url: str, payload: bytes, seconds: float) -> dict[str, Any]:
    """/health latencies while one client keeps sending ``payload`` (at least once)."""
    sends: list[tuple[float, float, int]] = []
    stop = threading.Event()

    def sender() -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            while not stop.is_set() or not sends:
                start = time.time()
                r = c.post(ECHO, content=payload, headers=JSON)
                sends.append((start, time.time(), r.status_code))

    proc, out = probe(url, seconds)
    thread = threading.Thread(target=sender)
    thread.start()
    samples = json.loads(out.read())
    proc.wait()
    stop.set()
    thread.join()
    # Only the polls that started while a big request was in flight.
    window = [(s, e) for s, e, _ in sends]
    during = [lat for start, lat in samples if any(s <= start <= e for s, e in window)]
    durations = [e - s for s, e, _ in sends]
    return {
        "health": during,
        "sends": len(sends),
        "status": sorted({code for *_, code in sends}),
        "request_s": sum(durations) / len(durations),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="polling time per phase")
    parser.add_argument("--bytes", type=int, default=None, help="body size (default: the limit)")
    parser.add_argument("--shapes", default="zeros,objects,strings,bigints,capped")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ensure_echo_plugin()
    limit = Settings().max_body_bytes
    # Older servers had no value limit: there "capped" is the same count, for comparison.
    max_values = getattr(Settings(), "max_json_values", 100_000)
    size = args.bytes or limit
    home = Path(tempfile.mkdtemp(prefix="kiapi-bench-body-"))
    server = start_server(home, {"KIAPI_PLUGINS": "echo", "KIAPI_MAX_BODY_BYTES": str(size)})
    try:
        with httpx.Client(base_url=server.url) as c:
            c.get("/health")
        idle_s = summary_ms(idle(server.url, args.seconds))
        rows: list[dict[str, Any]] = []
        for shape in args.shapes.split(","):
            payload = body(shape, size, max_values)
            result = busy(server.url, payload, args.seconds)
            during = summary_ms(result["health"])
            rows.append(
                {
                    "shape": shape,
                    "bytes": len(payload),
                    "status": ",".join(map(str, result["status"])),
                    "sends": result["sends"],
                    "request_ms": result["request_s"] * 1000,
                    "health_n": during["n"],
                    "busy p50": during["p50"],
                    "busy p99": during["p99"],
                    "busy max": during["max"],
                    "p99 ratio": during["p99"] / idle_s["p99"],
                    "peak_rss_mb": rss_mb(server.proc.pid, "VmHWM"),
                }
            )
    finally:
        server.stop()
    report = {"body_bytes": size, "default_limit": limit, "idle": idle_s, "rows": rows}
    if args.json:
        print(json.dumps(report))
        return
    print(f"body {size} bytes (default KIAPI_MAX_BODY_BYTES {limit}); /health idle:", end=" ")
    print(f"p50 {idle_s['p50']:.2f} ms, p99 {idle_s['p99']:.2f} ms, max {idle_s['max']:.2f} ms")
    columns = ["shape", "bytes", "status", "sends", "request_ms", "health_n"]
    columns += ["busy p50", "busy p99", "busy max", "p99 ratio", "peak_rss_mb"]
    print(table(rows, columns))


if __name__ == "__main__":
    main()
