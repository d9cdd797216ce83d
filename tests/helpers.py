"""Test helpers shared by the host test modules (import from here, never from conftest).

Live-server helpers come from ``kiapi_core.testing`` so host and plugin suites use one copy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

from kiapi_core.testing import LiveServer, free_port, start_server, wait_for

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "tests" / "plugins"

__all__ = [
    "PLUGINS",
    "ROOT",
    "LiveServer",
    "documented",
    "free_port",
    "install_plugin",
    "installed",
    "pip",
    "run_cli",
    "start_server",
    "uninstall_plugin",
    "uv",
    "wait_for",
]


def uv() -> str:
    """The uv next to this interpreter (the README puts it in .venv), else the one on PATH."""
    here = Path(sys.executable).parent / "uv"
    return str(here) if here.is_file() else "uv"


def documented(*routes: Any) -> dict[str, Any]:
    """The smallest OpenAPI fragment documenting exactly these Starlette routes (the host
    refuses a plugin whose fragment and routes disagree); WebSocket routes need none."""
    paths: dict[str, Any] = {}
    for route in routes:
        methods = getattr(route, "methods", None)
        if methods is None:
            continue
        item = paths.setdefault(route.path, {})
        for method in {m.lower() for m in methods} - {"head"}:
            item[method] = {"summary": "Test route", "responses": {"200": {"description": "ok"}}}
    return {"paths": paths}


def pip(*args: str) -> None:
    """uv's pip against this interpreter (uv-made venvs have no pip of their own)."""
    subprocess.run([uv(), "pip", *args, "--python", sys.executable, "-q"], check=True, cwd=ROOT)


def install_plugin(name: str) -> None:
    # A reinstall leaves a moment with no plugin installed, which fails any other pytest
    # session sharing this venv; skip it when the installed copy is already current.
    if not _installed_copy_is_current(name):
        pip("install", "--reinstall-package", f"kiapi-{name}", str(PLUGINS / name))


def _installed_copy_is_current(name: str) -> bool:
    try:
        dist = metadata.distribution(f"kiapi-{name}")
    except metadata.PackageNotFoundError:
        return False
    source = PLUGINS / name
    with (source / "pyproject.toml").open("rb") as fh:
        project = tomllib.load(fh)["project"]
    if dist.version != project["version"]:
        return False
    wanted = {(ep.name, ep.value) for ep in dist.entry_points if ep.group == "kiapi"}
    if wanted != set(project.get("entry-points", {}).get("kiapi", {}).items()):
        return False
    for module in source.glob("*.py"):
        installed = Path(str(dist.locate_file(module.name)))
        if not installed.is_file() or installed.read_bytes() != module.read_bytes():
            return False
    return True


def uninstall_plugin(name: str) -> None:
    pip("uninstall", f"kiapi-{name}")


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``kiapi ARGS`` in a fresh interpreter, so it sees the installed plugins as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "kiapi_core.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True
