"""Plugin health checks: what must work on this machine before a plugin's jobs can run.

A plugin registers ``HealthCheck(name, check)`` (hook ``register_health_checks``). Checks run
lazily, on first use (``GET /health``, ``kiapi plugins``, ``kiapi status``, ``kiapi activate``),
each at most once per process, on a thread of their own: a slow check never holds up the
event loop, and ``/health`` shows it ``pending`` until it is done. ``python_check(code)`` runs
Python in a subprocess, so a check that imports a native library (mlx, CUDA) never loads it
into the server, nor crashes it when the import segfaults.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class CheckFailed(Exception):
    """Raise from a check with a message a user can act on (no traceback is shown)."""


@dataclass(frozen=True)
class HealthCheck:
    """``check()`` returns a one-line detail (e.g. the device found) or raises when failing."""

    name: str
    check: Callable[[], str | None]
    timeout_s: float = 60.0
    description: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"health check name {self.name!r} must match {_NAME.pattern}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def python_check(code: str, *, timeout_s: float = 60.0) -> Callable[[], str]:
    """A check running ``python -c code`` with this interpreter: passing when it exits 0 (its
    last line of output is the detail), failing with the last line of its error output."""

    def run() -> str:
        try:
            proc = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"did not finish within {timeout_s:g}s") from None
        if proc.returncode != 0:
            why = _last_line(proc.stderr) or _last_line(proc.stdout)
            raise CheckFailed(why or f"exited with code {proc.returncode}")
        return _last_line(proc.stdout) or "ok"

    return run


@dataclass
class CheckResult:
    name: str
    status: str  # pending | ok | failed
    detail: str = ""
    seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "detail": self.detail,
            "seconds": self.seconds,
        }


_results: dict[HealthCheck, CheckResult] = {}
_threads: dict[HealthCheck, threading.Thread] = {}
_lock = threading.Lock()


def _run(check: HealthCheck) -> None:
    started = time.monotonic()
    try:
        detail = check.check()
        result = CheckResult(check.name, "ok", str(detail or "ok"))
    except Exception as exc:
        why = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
        result = CheckResult(check.name, "failed", why)
    result.seconds = round(time.monotonic() - started, 3)
    with _lock:
        _results[check] = result


def start(checks: Iterable[HealthCheck]) -> None:
    """Start the checks not started yet in this process (each on a daemon thread)."""
    with _lock:
        for check in checks:
            if check not in _threads:
                thread = threading.Thread(
                    target=_run, args=(check,), name=f"kiapi-check-{check.name}", daemon=True
                )
                _threads[check] = thread
                thread.start()


def results(checks: Iterable[HealthCheck], *, wait: bool = False) -> list[CheckResult]:
    """Each check's result, started if need be; ``wait``: until done or past its timeout."""
    checks = list(checks)
    start(checks)
    out = []
    for check in checks:
        if wait:
            _threads[check].join(check.timeout_s + 5)
        with _lock:
            result = _results.get(check)
        if result is None and wait:
            result = CheckResult(
                check.name, "failed", f"did not finish within {check.timeout_s:g}s"
            )
        out.append(result or CheckResult(check.name, "pending"))
    return out
