"""Model processes keep freed buffers instead of faulting them in afresh (runtime/malloc.py).

MLX's CPU buffers are plain malloc; glibc served the large ones from mmap and unmapped them on
free, so a 256x256 generation took 1.35 million page faults and ran 3-6% slower or faster from
one process to the next (bench/overhead.py). Each check runs in a fresh interpreter: the
settings are process-wide and made once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest

from kiapi_core.runtime.malloc import M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD, _wanted

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc, /proc")

CHURN = """
import json, sys
from kiapi_core.runtime.malloc import give_back_free_memory, tune_for_models

def faults():
    with open("/proc/self/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[7])

def rss_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20

if sys.argv[1] == "tuned":
    tune_for_models()
size = 48 * 2**20  # past glibc's largest mmap threshold (32 MB)
buf = bytearray(size)  # the first one is faulted in either way
del buf
start = faults()
for _ in range(4):
    buf = bytearray(size)  # zeroed: every page is touched, as a layer's output is
    del buf
churn = faults() - start
kept = [bytearray(8 * 2**20) for _ in range(25)]  # 200 MB in buffers, then freed
del kept
before = rss_mb()
give_back_free_memory()
print(json.dumps({"faults": churn, "rss_before_mb": before, "rss_after_mb": rss_mb()}))
"""


def _churn(mode: str, **env: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHURN), mode],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_a_model_process_reuses_freed_buffers_without_page_faults() -> None:
    pages = 4 * 48 * 2**20 // 4096
    default = _churn("default")
    tuned = _churn("tuned")
    assert default["faults"] > pages * 0.9, default  # each buffer faulted in afresh
    assert tuned["faults"] < pages * 0.02, tuned  # the same pages, reused


def test_the_memory_kept_is_given_back_when_the_budget_reads_it() -> None:
    tuned = _churn("tuned")
    # Freed buffers stay resident (for the next step) until give_back_free_memory, which the
    # memory budget and the worker's RSS ceiling call before they read the resident set.
    assert tuned["rss_before_mb"] - tuned["rss_after_mb"] > 150, tuned


def test_explicit_malloc_settings_in_the_environment_are_left_alone() -> None:
    assert _wanted({}) == {M_ARENA_MAX: 1, M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}
    assert M_ARENA_MAX not in _wanted({"MALLOC_ARENA_MAX": "4"})
    assert _wanted({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=8"}) == {M_ARENA_MAX: 1}
    assert _wanted({"MALLOC_TRIM_THRESHOLD_": "1000", "MALLOC_ARENA_MAX": "2"}) == {}
    # An explicit setting is respected in the process too: its buffers are mmapped as before.
    assert _churn("tuned", MALLOC_MMAP_MAX_="65536")["faults"] > 4 * 48 * 2**20 // 4096 * 0.9


def test_a_worker_keeps_a_jobs_buffers_for_the_next_then_gives_them_back_when_idle(
    live_server: Callable[..., Any],
) -> None:
    from kiapi_core.runtime.rss import rss_mb

    idle_s = 3
    server = live_server(
        {"KIAPI_PLUGINS": "echo", "KIAPI_WORKERS": "1", "KIAPI_WORKER_HEAP_IDLE_S": str(idle_s)}
    )
    with server.client() as c:
        job = {"text": "hi", "steps": 3, "delay_s": 0, "scratch_mb": 300}
        r = c.post("/v1/text/echo/run", json=job, headers={"Accept": "application/json"})
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        pid = c.get("/health").json()["worker"]["pid"]
        kept = rss_mb(pid)
        assert kept is not None and kept > 300, kept  # freed, yet kept for the next job
        deadline = time.monotonic() + idle_s + 15
        while time.monotonic() < deadline and (rss_mb(pid) or 0) > kept - 250:
            time.sleep(0.5)
        assert (rss_mb(pid) or 0) < kept - 250, (kept, rss_mb(pid))  # given back once idle
