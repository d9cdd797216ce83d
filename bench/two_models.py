"""Two real models, one memory budget: ideogram4 and zimage (tiny checkpoints) alternating in one
server, with a budget that holds only one of them and with room for both.

Prints, side by side, the loads each model needed and the request times: with one slot every
request pays a load (the least recently used model is evicted), with room for both only the
first two do.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from _harness import CACHE, OFFLINE, table, tiny_checkpoint

from kiapi_core.testing import kiapi_command, start_server

ROUNDS = int(os.environ.get("KIAPI_BENCH_ROUNDS", "6"))
REQUESTS = [
    (
        "ideogram4",
        "/v1/image/ideogram4/generate",
        {"prompt": "a red cat", "width": 256, "height": 256, "preset": "V4_TURBO_12"},
    ),
    (
        "zimage",
        "/v1/image/zimage/generate",
        {"prompt": "a red cat", "width": 64, "height": 64, "steps": 2},
    ),
]


def zimage_checkpoint() -> Path:
    from kiapi_zimage.testing import build_tiny_checkpoint

    path = CACHE / "z-image-tiny"
    if not (path / "model_index.json").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        build_tiny_checkpoint(path)
    return path


def run(limit_gb: float, weights: dict[str, Path]) -> dict[str, object]:
    home = Path(tempfile.mkdtemp(prefix="kiapi-bench-two-"))
    for family, path in weights.items():
        subprocess.run(
            kiapi_command("activate", family, "--path", str(path)),
            env={**os.environ, **OFFLINE, "KIAPI_HOME": str(home), "KIAPI_PLUGINS": family},
            check=True,
            capture_output=True,
        )
    env = {**OFFLINE, "KIAPI_PLUGINS": "ideogram4,zimage", "KIAPI_MEMORY_LIMIT_GB": str(limit_gb)}
    live = start_server(home, env)
    times: dict[str, list[float]] = {"ideogram4": [], "zimage": []}
    refused = 0
    try:
        client = live.client(timeout=900)
        for i in range(ROUNDS):
            family, path, body = REQUESTS[i % 2]
            started = time.perf_counter()
            r = client.post(path, json={**body, "seed": i})
            times[family].append(time.perf_counter() - started)
            refused += r.status_code != 200
        rows = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    finally:
        live.stop()
    return {
        "limit_gb": limit_gb,
        "ideogram4_loads": rows["ideogram4/fp8"]["loads"],
        "zimage_loads": rows["zimage/turbo"]["loads"],
        "refused": refused,
        "ideogram4_s": sum(times["ideogram4"]) / len(times["ideogram4"]),
        "zimage_s": sum(times["zimage"]) / len(times["zimage"]),
        "total_s": sum(map(sum, times.values())),
    }


def main() -> None:
    from kiapi_ideogram4.catalog import FP8
    from kiapi_zimage.catalog import TURBO

    weights = {"ideogram4": tiny_checkpoint(), "zimage": zimage_checkpoint()}
    need = FP8.memory_for(weights["ideogram4"], {}) + TURBO.memory_for(weights["zimage"], {})
    one = run(round(need - 0.05, 2), weights)
    both = run(round(need + 2, 2), weights)
    print(f"{ROUNDS} alternating requests (ideogram4 256x256 turbo, zimage 64x64 2 steps)")
    columns = list(one)
    print(table([{"budget": "one model", **one}, {"budget": "both", **both}], ["budget", *columns]))
    print(f"one-slot / roomy total time: {one['total_s'] / both['total_s']:.2f}x")  # type: ignore[operator]


if __name__ == "__main__":
    main()
