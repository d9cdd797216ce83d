"""Live previews cost: the same generation with previews on and off, side by side in one run.

One server on the tiny checkpoint with a preview at every step and no interval between them
(KIAPI_PREVIEW_MIN_INTERVAL_S=0: the most previews the settings allow; the default 0.5 s
interval allows fewer); pairs of async generations, one with the request's `preview: false`,
in alternating order, each followed over SSE to its end. The figure is the median of the
per-pair ratios of the CPU seconds the server and its worker process spent (steady on a busy
machine, where wall time is not; one BLAS thread, so none spins), with the model's own time (result `timings.total_s`) beside
it. Also: what one preview
costs in the handler at 1024 x 1024 (projection + JPEG), timed in this process.

    uv run python bench/previews.py [--pairs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from _harness import ideogram_server

from kiapi_core.testing.sse import job_events

BODY = {
    "prompt": "a red poster that says HELLO",
    "width": 256,
    "height": 256,
    "preset": "V4_TURBO_12",
    "mode": "async",
}


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(c: Any, pids: list[int], seed: int, preview: bool) -> tuple[float, float, int]:
    """The model's seconds for one generation, the CPU seconds the server and its worker
    spent on it, and how many previews its stream carried."""
    before = sum(cpu_s(p) for p in pids)
    r = c.post("/v1/image/ideogram4/generate", json={**BODY, "seed": seed, "preview": preview})
    r.raise_for_status()
    events = job_events(c, r.json()["job_id"], timeout=900)
    end = events[-1].data
    if end["status"] != "succeeded":
        raise SystemExit(f"generation failed: {end}")
    cpu = sum(cpu_s(p) for p in pids) - before
    model_s = float(end["result"]["timings"]["total_s"])
    return model_s, cpu, sum(e.event == "preview" for e in events)


def preview_cost_ms(side: int = 1024, runs: int = 20) -> float:
    """Median milliseconds of one preview (latent -> RGB -> PIL -> JPEG) at ``side`` x ``side``."""
    import numpy as np
    from kiapi_ideogram4.preview import LatentSpaces, latent_to_rgb
    from mflux.models.ideogram4.latent_creator import Ideogram4LatentCreator
    from PIL import Image

    from kiapi_core.jobs.previews import build_preview

    rng = np.random.default_rng(0)
    spaces = LatentSpaces.of(
        Ideogram4LatentCreator.LATENT_SHIFT,
        Ideogram4LatentCreator.LATENT_SCALE,
        rng.normal(0, 0.3, 128),
        rng.uniform(0.5, 2, 128),
        1e-4,
    )
    z = rng.standard_normal((1, (side // 16) ** 2, 128)).astype(np.float32)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        image = Image.fromarray(latent_to_rgb(z, side, side, spaces), "RGB")
        build_preview("job_bench", image, 1, 20)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # One BLAS thread: idle BLAS threads spin, and their CPU time (which varies with what
    # else the machine runs) would drown a difference of milliseconds.
    server = ideogram_server(
        {
            "KIAPI_PREVIEW_MIN_INTERVAL_S": "0",
            "KIAPI_PREVIEW_EVERY": "1",
            "OPENBLAS_NUM_THREADS": "1",
        }
    )
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    counts: list[int] = []
    try:
        with server.client(timeout=900) as c:
            one(c, [server.proc.pid], 99, True)  # warm-up: starts the worker, loads the model
            pids = [server.proc.pid, int(c.get("/health").json()["worker"]["pid"])]
            for i in range(args.pairs):
                order = (True, False) if i % 2 == 0 else (False, True)
                for preview in order:
                    model_s, cpu, n = one(c, pids, i, preview)
                    runs[preview].append((model_s, cpu))
                    if preview:
                        counts.append(n)
    finally:
        server.stop()

    def ratios(k: int) -> list[float]:
        return [a[k] / b[k] for a, b in zip(runs[True], runs[False], strict=True)]

    result = {
        "pairs": args.pairs,
        "size": BODY["width"],
        "preset": BODY["preset"],
        "on_median_s": round(statistics.median(r[0] for r in runs[True]), 3),
        "off_median_s": round(statistics.median(r[0] for r in runs[False]), 3),
        "ratio_median": round(statistics.median(ratios(0)), 4),
        "ratios": [round(r, 4) for r in ratios(0)],
        "on_cpu_median_s": round(statistics.median(r[1] for r in runs[True]), 3),
        "off_cpu_median_s": round(statistics.median(r[1] for r in runs[False]), 3),
        "cpu_ratio_median": round(statistics.median(ratios(1)), 4),
        "cpu_ratios": [round(r, 4) for r in ratios(1)],
        "previews_per_run": counts,
        "preview_ms_1024": round(preview_cost_ms(), 2),
    }
    result["pass"] = result["cpu_ratio_median"] <= 1.02 and min(counts) >= 1
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"previews on/off, {args.pairs} interleaved pairs ({BODY['width']}² {BODY['preset']},"
        f" previews per run {counts}): CPU of server + worker, median ratio"
        f" {result['cpu_ratio_median']:.4f} ({result['on_cpu_median_s']} s vs"
        f" {result['off_cpu_median_s']} s); model wall time, median ratio"
        f" {result['ratio_median']:.4f} ({result['on_median_s']} s vs {result['off_median_s']} s)"
    )
    print(f"one preview at 1024²: {result['preview_ms_1024']} ms (projection + JPEG)")
    print("PASS" if result["pass"] else "FAIL")


if __name__ == "__main__":
    main()
