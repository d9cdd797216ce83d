"""Shared by the benchmarks: a tiny checkpoint, a server started as the README starts it, stats."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kiapi_core.testing import LiveServer, kiapi_command, start_server

OFFLINE = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
CACHE = Path(os.environ.get("KIAPI_BENCH_CACHE", Path(tempfile.gettempdir()) / "kiapi-bench"))


def tiny_checkpoint() -> Path:
    """Built once and reused across benchmark runs (deterministic for a seed)."""
    from kiapi_ideogram4.testing import build_tiny_checkpoint

    path = CACHE / "ideogram-4-tiny"
    if not (path / "model_index.json").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        build_tiny_checkpoint(path)
    return path


def ideogram_server(env: dict[str, str] | None = None) -> LiveServer:
    """A fresh KIAPI_HOME with the tiny checkpoint activated, served by `kiapi serve`."""
    home = Path(tempfile.mkdtemp(prefix="kiapi-bench-"))
    subprocess.run(
        kiapi_command("activate", "ideogram4", "--path", str(tiny_checkpoint())),
        env={**os.environ, **OFFLINE, "KIAPI_HOME": str(home)},
        check=True,
        capture_output=True,
    )
    return start_server(home, {**OFFLINE, **(env or {})})


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50": pct(ms, 50),
        "p99": pct(ms, 99),
        "max": max(ms) if ms else float("nan"),
        "mean": statistics.fmean(ms) if ms else float("nan"),
    }


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process (``VmHWM``: its peak) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    out = ["  ".join(c.ljust(widths[c]) for c in columns)]
    for r in rows:
        out.append("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def python() -> str:
    return sys.executable


def now() -> float:
    return time.perf_counter()


def ensure_echo_plugin() -> None:
    """The echo test plugin gives cheap jobs; install it (as the tests do) when missing or
    older than its source."""
    from importlib import metadata

    source = Path(__file__).resolve().parent.parent / "tests" / "plugins" / "echo"
    try:
        installed = Path(str(metadata.distribution("kiapi-echo").locate_file("kiapi_echo.py")))
        current = installed.read_bytes() == (source / "kiapi_echo.py").read_bytes()
    except (metadata.PackageNotFoundError, OSError):
        current = False
    if not current:
        subprocess.run(
            [
                "uv",
                "pip",
                "install",
                "-q",
                "--reinstall-package",
                "kiapi-echo",
                "--python",
                sys.executable,
                str(source),
            ],
            check=True,
        )
