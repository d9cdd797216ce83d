"""Cold start of `kiapi serve`: time to the first 200 of /openapi.json, idle RSS, heavy libraries.

Starts a fresh server process on a free loopback port, N times per configuration:

- ``starlette``: a bare Starlette app under uvicorn serving one JSON route (the floor),
- ``+ pydantic``: the same app building and using one pydantic model first (what any app
  validating with pydantic pays),
- ``+ settings``: the same app importing click and reading kiapi's Settings first (pydantic,
  the Settings model, the package's small ``__init__`` with pluggy): what every kiapi start
  pays before its jobs, files and plugins,
- ``kiapi host``: ``kiapi serve`` with no plugins (``KIAPI_PLUGINS=``),
- ``kiapi all``: ``kiapi serve`` with every installed plugin, as a user runs it,

Each configuration starts once first in its own KIAPI_HOME (printed as "first start": it builds
the OpenAPI caches under $KIAPI_HOME/cache), then every timed start reuses that home, as a
restarted server does (the caches lived in ~/.cache, shared by every home, when the figures
of the first releases were taken). The timed starts of the configurations are interleaved,
and the bench prints median/min/max start time, the ratio of medians to the floor, idle RSS (VmRSS from
/proc/PID/status) and which heavy native libraries the process has mapped (from /proc/PID/maps,
so the server needs no debug endpoint). For kiapi, after the idle RSS is read, the first
`GET /v1/jobs` and a second one are timed: what a start leaves to the first request (modules
and pydantic models built at first use). Linux only (it reads /proc).

    uv run python bench/cold_start.py [--runs 7] [--json] [--timeout 180]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Shared objects that give a heavy library away once it is imported.
HEAVY_LIBRARIES = {
    "mlx": re.compile(r"libmlx|/mlx/core\."),
    "numpy": re.compile(r"numpy/(_?core)/_multiarray_umath"),
    "torch": re.compile(r"libtorch|torch/_C\."),
    "PIL": re.compile(r"PIL/_imaging\."),
    "tokenizers": re.compile(r"tokenizers/tokenizers\."),
    "safetensors": re.compile(r"safetensors/_safetensors_rust\."),
}

BASELINE_APP = """
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def doc(request):
    return JSONResponse({"openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "paths": {}})

app = Starlette(routes=[Route("/openapi.json", doc)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


# The floor plus pydantic with one model built and used, as any app validating with it pays.
PYDANTIC_APP = BASELINE_APP.replace(
    "import uvicorn\n",
    "import uvicorn\nfrom pydantic import BaseModel\n"
    "class Probe(BaseModel):\n    name: str = 'x'\nProbe()\n",
)


# The floor plus what every kiapi start needs before it loads a plugin: its settings (pydantic
# and the Settings model, read from the environment) and its CLI (click).
SETTINGS_APP = BASELINE_APP.replace(
    "import uvicorn\n",
    "import uvicorn\nimport click\nfrom kiapi_core.settings import Settings\nSettings()\n",
)


@dataclass
class Config:
    name: str
    argv: list[str]  # "{port}" is replaced
    env: dict[str, str] = field(default_factory=dict)
    # A kiapi server: after the idle RSS, its first GET /v1/jobs is timed (and a second).
    jobs_route: bool = False


@dataclass
class Run:
    start_s: float
    rss_mb: float
    heavy: list[str]
    # What a start leaves to the first request (modules, models built at first use).
    first_jobs_ms: float | None = None
    second_jobs_ms: float | None = None


@dataclass
class Result:
    name: str
    runs: list[Run]
    errors: list[str]
    first_start_s: float | None = None

    def starts(self) -> list[float]:
        return [r.start_s for r in self.runs]

    def jobs_ms(self) -> tuple[float, float] | None:
        """Medians of the first and the second GET /v1/jobs after a start."""
        timed = [r for r in self.runs if r.first_jobs_ms is not None]
        if not timed:
            return None
        return (
            statistics.median(r.first_jobs_ms for r in timed),
            statistics.median(r.second_jobs_ms for r in timed),
        )

    def summary(self) -> dict[str, object]:
        starts = self.starts()
        return {
            "name": self.name,
            "runs": len(self.runs),
            "start_s": {
                "median": round(statistics.median(starts), 4) if starts else None,
                "min": min(starts) if starts else None,
                "max": max(starts) if starts else None,
            },
            "rss_mb_median": statistics.median([r.rss_mb for r in self.runs])
            if self.runs
            else None,
            "heavy": sorted({h for r in self.runs for h in r.heavy}),
            "first_start_s": self.first_start_s,
            "jobs_ms_first_second": self.jobs_ms(),
            "errors": self.errors,
            "samples": [asdict(r) for r in self.runs],
        }


def configs(before: str | None = None) -> list[Config]:
    serve = [sys.executable, "-m", "kiapi_core.cli", "serve", "--port", "{port}"]
    out = [
        Config("starlette", [sys.executable, "-c", BASELINE_APP, "{port}"]),
        Config("+ pydantic", [sys.executable, "-c", PYDANTIC_APP, "{port}"]),
        Config("+ settings", [sys.executable, "-c", SETTINGS_APP, "{port}"]),
        Config("kiapi host", serve, {"KIAPI_PLUGINS": ""}, jobs_route=True),
        Config("kiapi all", serve, jobs_route=True),
    ]
    if before:
        # -m puts the working directory (this checkout) ahead of PYTHONPATH: PYTHONSAFEPATH.
        # The older checkout's plugins too: the installed ones are this checkout's (editable).
        root = Path(before).resolve()
        paths = [root, *sorted(p for p in (root / "plugins").glob("*") if p.is_dir())]
        older = {"PYTHONPATH": os.pathsep.join(map(str, paths)), "PYTHONSAFEPATH": "1"}
        out += [
            Config("before host", serve, {**older, "KIAPI_PLUGINS": ""}, jobs_route=True),
            Config("before all", serve, older, jobs_route=True),
        ]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_ok(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/openapi.json")
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _timed_get_ms(port: int, path: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.connect()  # the connection is not what is timed
        started = time.perf_counter()
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        took = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status}")
        return round(took, 2)
    finally:
        conn.close()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _heavy(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted(name for name, pattern in HEAVY_LIBRARIES.items() if pattern.search(maps))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def one_run(
    config: Config, home: Path, timeout_s: float, idle_s: float, *, timed: bool = True
) -> Run:
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in config.argv]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KIAPI_")},
        "KIAPI_HOME": str(home),
        **config.env,
    }
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        while not _get_ok(port):
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"exited with {proc.returncode}: {err[-500:]}")
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"no 200 from /openapi.json within {timeout_s:g}s")
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        # Idle: what the process holds once the start-up garbage has settled.
        time.sleep(idle_s)
        run = Run(round(elapsed, 4), round(_rss_mb(proc.pid), 1), _heavy(proc.pid))
        if config.jobs_route and timed:
            run.first_jobs_ms = _timed_get_ms(port, "/v1/jobs?limit=1")
            run.second_jobs_ms = _timed_get_ms(port, "/v1/jobs?limit=1")
        return run
    finally:
        _stop(proc)


def bench(runs: int, budget_s: float, idle_s: float, before: str | None = None) -> list[Result]:
    deadline = time.monotonic() + budget_s
    results = [Result(c.name, [], []) for c in configs(before)]
    with tempfile.TemporaryDirectory(prefix="kiapi-bench-") as tmp:
        for config, result in zip(configs(before), results, strict=True):
            home = Path(tmp) / config.name.replace(" ", "-")
            try:
                result.first_start_s = one_run(config, home, 60.0, 0, timed=False).start_s
            except RuntimeError as exc:
                result.errors.append(f"first start: {exc}")
        # Interleaved, so a burst of load on the machine does not land on one configuration.
        for i in range(runs):
            for config, result in zip(configs(before), results, strict=True):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    result.errors.append(f"run {i + 1} skipped: time budget spent")
                    continue
                try:
                    home = Path(tmp) / config.name.replace(" ", "-")
                    result.runs.append(one_run(config, home, min(30.0, remaining), idle_s))
                except RuntimeError as exc:
                    result.errors.append(f"run {i + 1}: {exc}")
    return results


def table(results: list[Result]) -> str:
    floor = statistics.median(results[0].starts()) if results[0].runs else None
    head = (
        f"{'configuration':<14} {'runs':>4} {'median s':>9} {'min s':>7} {'max s':>7}"
        f" {'x floor':>8} {'RSS MB':>7} {'first s':>8} {'jobs 1st/2nd ms':>16}  heavy libraries mapped"
    )
    lines = [head, "-" * len(head)]
    for result in results:
        if not result.runs:
            lines.append(f"{result.name:<14} {0:>4}  (no successful run)")
            continue
        starts = result.starts()
        median = statistics.median(starts)
        ratio = f"{median / floor:.2f}" if floor else "-"
        rss = statistics.median(r.rss_mb for r in result.runs)
        heavy = ", ".join(sorted({h for r in result.runs for h in r.heavy})) or "none"
        jobs = result.jobs_ms()
        jobs_text = f"{jobs[0]:.1f} / {jobs[1]:.1f}" if jobs else "-"
        lines.append(
            f"{result.name:<14} {len(starts):>4} {median:>9.3f} {min(starts):>7.3f}"
            f" {max(starts):>7.3f} {ratio:>8} {rss:>7.1f} {result.first_start_s or 0:>8.3f}"
            f" {jobs_text:>16}  {heavy}"
        )
    for result in results:
        lines.extend(f"! {result.name}: {e}" for e in result.errors)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="starts per configuration (7)")
    parser.add_argument("--timeout", type=float, default=180, help="total budget, seconds (180)")
    parser.add_argument("--idle", type=float, default=0.5, help="idle wait before RSS, s (0.5)")
    parser.add_argument(
        "--before",
        help="Also start the kiapi_core of this checkout (`git archive <rev> kiapi_core`"
        " unpacked), interleaved with the others",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if not Path("/proc/self/status").exists():
        parser.error("needs Linux /proc (RSS and mapped libraries are read from it)")
    # As the README's install step does: kiapi's own sources compiled, like its dependencies.
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "kiapi_core", "plugins"], cwd=root, check=True
    )
    # And the dependencies, as the README's `uv sync --compile-bytecode` does: a venv synced
    # without it (and PYTHONDONTWRITEBYTECODE set) recompiles pydantic, starlette and the rest
    # at every start, which measured ~40% of kiapi's start-up CPU and says nothing about kiapi.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j0", sysconfig.get_paths()["purelib"]],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if args.before:
        subprocess.run([sys.executable, "-m", "compileall", "-q", args.before], check=True)
    results = bench(args.runs, args.timeout, args.idle, args.before)
    if args.json:
        print(json.dumps([r.summary() for r in results], indent=2))
    else:
        print(
            f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs,"
            f" {args.runs} runs per configuration"
        )
        print(table(results))
    return 0 if all(r.runs and not r.errors for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
