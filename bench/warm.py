"""Models stay warm: N sequential requests load the model once; a quantize override loads a
transient model and leaves the resident one alone; the idle TTL unloads it.

    uv run python bench/warm.py [--requests 10] [--ttl 6] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from _harness import ideogram_server

from kiapi_core.testing import wait_for

BODY = {
    "prompt": "a red poster that says HELLO",
    "width": 256,
    "height": 256,
    "preset": "V4_TURBO_12",
}


def fp8(c: Any) -> dict[str, Any]:
    return next(m for m in c.get("/v1/models").json()["data"] if m["id"] == "ideogram4/fp8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--ttl", type=float, default=6.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server = ideogram_server(
        {"KIAPI_MODEL_IDLE_TTL_S": str(args.ttl), "KIAPI_SWEEP_INTERVAL_S": "1"}
    )
    seconds: list[float] = []
    try:
        with server.client(timeout=900) as c:
            for i in range(args.requests):
                t = time.perf_counter()
                c.post("/v1/image/ideogram4/generate", json={**BODY, "seed": i}).raise_for_status()
                seconds.append(time.perf_counter() - t)
            after_requests = fp8(c)
            t = time.perf_counter()
            c.post(
                "/v1/image/ideogram4/generate", json={**BODY, "seed": 0, "quantize": 8}
            ).raise_for_status()
            transient_s = time.perf_counter() - t
            after_transient = fp8(c)
            health = c.get("/health").json()["models"]
            # Touch the resident model, then time how long it stays once idle.
            c.post("/v1/image/ideogram4/generate", json={**BODY, "seed": 1}).raise_for_status()
            before_idle = fp8(c)
            idle_start = time.perf_counter()
            wait_for(lambda: not fp8(c)["resident"], timeout=args.ttl + 30, interval=0.25)
            unloaded_after = time.perf_counter() - idle_start
            c.post("/v1/image/ideogram4/generate", json={**BODY, "seed": 0}).raise_for_status()
            after_reload = fp8(c)
    finally:
        server.stop()
    result = {
        "requests": args.requests,
        "loads_after_requests": after_requests["loads"],
        "first_request_s": round(seconds[0], 2),
        "warm_request_median_s": round(statistics.median(seconds[1:]), 2),
        "quantize_override": {
            "transient_loads": after_transient["transient_loads"],
            "resident_loads": after_transient["loads"],
            "resident": after_transient["resident"],
            "transient_models_after": health["transient"],
            "seconds": round(transient_s, 2),
        },
        "idle_ttl_s": args.ttl,
        "unloaded_after_idle_s": round(unloaded_after, 2),
        "loads_before_idle": before_idle["loads"],
        "loads_after_reload": after_reload["loads"],
        "pass": args.ttl <= unloaded_after <= args.ttl + 10
        and after_requests["loads"] == 1
        and after_transient["loads"] == 1
        and after_transient["transient_loads"] == 1
        and after_transient["resident"]
        and health["transient"] == 0
        and after_reload["loads"] == before_idle["loads"] + 1,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{args.requests} sequential requests: model loads = {result['loads_after_requests']} "
        f"(first {result['first_request_s']}s incl. load, then median {result['warm_request_median_s']}s)"
    )
    q = result["quantize_override"]
    print(
        f"quantize=8 override: transient loads = {q['transient_loads']}, resident loads still "
        f"{q['resident_loads']}, resident kept = {q['resident']}, transient left = {q['transient_models_after']} ({q['seconds']}s)"
    )
    print(
        f"idle TTL {args.ttl:g}s: unloaded {result['unloaded_after_idle_s']}s after the last request; "
        f"next request loaded again (loads {result['loads_before_idle']} -> {result['loads_after_reload']})"
    )
    print("PASS" if result["pass"] else "FAIL")


if __name__ == "__main__":
    main()
