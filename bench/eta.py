"""ETA accuracy: how far a running job's ``eta_s`` is from the time it really had left.

Runs a mix of jobs one after another on one ``kiapi serve`` (worker process): ideogram4 on the
tiny checkpoint at two sizes and two step counts (its own phase model), and echo jobs of a
known duration, one kind declaring its ETA, the others left to the host's estimate (recent run
times and the progress rate). Each job is polled; at 25/50/75 % of its real duration the
``eta_s`` shown then is compared with the time it really had left. The first job of each shape
is warm-up (a cold model, nothing learned yet) and left out of the figures.

    uv run python bench/eta.py [--repeat 2] [--no-ideogram] [--json]
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
from _harness import ensure_echo_plugin, ideogram_server, table

from kiapi_core.testing import LiveServer

CHECKPOINTS = (0.25, 0.5, 0.75)
TARGET = 0.15
IDEOGRAM = "/v1/image/ideogram4/generate"
ECHO = "/v1/text/echo/run"
PROMPT = "a red poster that says HELLO"


def shapes(with_ideogram: bool) -> list[tuple[str, str, dict[str, Any]]]:
    echo = [
        ("echo 3 s, declared", ECHO, {"steps": 30, "delay_s": 0.1, "declare_eta": True}),
        ("echo 3 s, host", ECHO, {"steps": 30, "delay_s": 0.1}),
        ("echo 5 s, host", ECHO, {"steps": 20, "delay_s": 0.25}),
    ]
    if not with_ideogram:
        return echo
    return [
        (f"ideogram4 {w}x{h} {preset}", IDEOGRAM, {"width": w, "height": h, "preset": preset})
        for w, h in ((256, 256), (256, 384))
        for preset in ("V4_TURBO_12", "V4_DEFAULT_20")
    ] + echo


def run_job(server: LiveServer, path: str, body: dict[str, Any], seed: int) -> dict[str, Any]:
    """Submit one job, poll it to its end; its samples (time, eta_s) and its real span."""
    if path == IDEOGRAM:
        body = {"prompt": PROMPT, "seed": seed, **body}
    else:
        body = {"text": f"eta {seed}", **body}
    samples: list[tuple[float, float | None]] = []
    with server.client(timeout=600) as c:
        r = c.post(path, json={**body, "mode": "async"})
        r.raise_for_status()
        job_id = r.json()["job_id"]
        while True:
            job = c.get(f"/v1/jobs/{job_id}").json()
            if job["status"] == "running":
                samples.append((time.time(), job["eta_s"]))
            elif job["status"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.1)
    if job["status"] != "succeeded":
        raise SystemExit(f"job {job_id} ended {job['status']}: {job['error']}")
    return {"samples": samples, "started": job["started_at"], "finished": job["finished_at"]}


def errors(run: dict[str, Any]) -> list[float | None]:
    """|eta_s - real time left| / real time left at each checkpoint (None: no estimate)."""
    start, end = run["started"], run["finished"]
    out: list[float | None] = []
    for c in CHECKPOINTS:
        at = start + c * (end - start)
        t, eta = min(run["samples"], key=lambda s: abs(s[0] - at))
        left = end - t
        out.append(None if eta is None or left <= 0 else abs(eta - left) / left)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=2, help="measured jobs per shape")
    parser.add_argument("--no-ideogram", action="store_true", help="echo jobs only (quick)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ensure_echo_plugin()
    kinds = shapes(not args.no_ideogram)
    server = ideogram_server({"KIAPI_PLUGINS": "ideogram4,echo", "KIAPI_WORKER_NICE": "0"})
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in kinds}
    started = time.perf_counter()
    try:
        # Round-robin: every shape's first run is its warm-up, and the shapes share the noise.
        for i in range(args.repeat + 1):
            for name, path, body in kinds:
                runs[name].append(run_job(server, path, body, seed=i))
    finally:
        server.stop()
    rows, every = [], []
    by_kind: dict[str, list[float]] = {}
    for name, measured in runs.items():
        per_point: list[list[float]] = [[] for _ in CHECKPOINTS]
        missing = 0
        for run in measured[1:]:
            for k, err in enumerate(errors(run)):
                if err is None:
                    missing += 1
                else:
                    per_point[k].append(err)
        values = [e for point in per_point for e in point]
        every.extend(values)
        by_kind.setdefault(name.split()[0], []).extend(values)
        durations = [r["finished"] - r["started"] for r in measured[1:]]
        rows.append(
            {
                "shape": name,
                "jobs": len(measured) - 1,
                "duration_s": statistics.median(durations),
                **{
                    f"err@{int(c * 100)}%": statistics.median(point) if point else float("nan")
                    for c, point in zip(CHECKPOINTS, per_point, strict=True)
                },
                "median": statistics.median(values) if values else float("nan"),
                "no_eta": missing,
                "warmup_err": statistics.median(
                    [e for e in errors(measured[0]) if e is not None] or [float("nan")]
                ),
            }
        )
    overall = statistics.median(every) if every else float("nan")
    report = {
        "rows": rows,
        "median": overall,
        "by_kind": {k: statistics.median(v) for k, v in by_kind.items() if v},
        "target": TARGET,
        "pass": overall <= TARGET and all(r["no_eta"] == 0 for r in rows),
        "seconds": time.perf_counter() - started,
    }
    if args.json:
        print(json.dumps(report))
        return
    columns = ["shape", "jobs", "duration_s", "err@25%", "err@50%", "err@75%", "median"]
    print(table(rows, [*columns, "no_eta", "warmup_err"]))
    print(
        f"\nmedian absolute ETA error (fraction of the real time left), warm-up excluded:"
        f" {overall:.3f} (target <= {TARGET}; {'pass' if report['pass'] else 'FAIL'});"
        f" {report['seconds']:.0f} s"
    )
    print("by kind: " + ", ".join(f"{k} {v:.3f}" for k, v in report["by_kind"].items()))


if __name__ == "__main__":
    main()
