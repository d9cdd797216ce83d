"""Shared fixtures: the echo test plugin pip-installed for the session, apps, live servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from kiapi_core.app import create_app
from kiapi_core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "tests" / "plugins"


def pip(*args: str) -> None:
    """uv's pip against this interpreter (uv-made venvs have no pip of their own)."""
    subprocess.run(["uv", "pip", *args, "--python", sys.executable, "-q"], check=True, cwd=ROOT)


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


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No KIAPI_* from the developer's shell (a stray KIAPI_API_KEY would fail every test)."""
    for name in list(os.environ):
        if name.startswith("KIAPI_"):
            monkeypatch.delenv(name)
    # Also keeps ~/.kiapi/config.toml out: its default location follows KIAPI_HOME.
    monkeypatch.setenv("KIAPI_HOME", str(tmp_path / "env-home"))


@pytest.fixture(scope="session", autouse=True)
def echo_plugin() -> Iterator[None]:
    """The echo test plugin, installed with pip like any third-party plugin."""
    was_installed = _installed("kiapi-echo")
    install_plugin("echo")
    yield
    # Leave the environment as found: another pytest session sharing this venv may be
    # relying on the plugin right now.
    if not was_installed:
        uninstall_plugin("echo")


def _installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def make_settings(home: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {"home": home, "plugins": ["echo"], "sweep_interval_s": 1.0}
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen[bytes]
    home: Path
    log: Path

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)  # type: ignore[arg-type]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def start_server(
    home: Path, env: dict[str, str] | None = None, port: int | None = None, wait_s: float = 60
) -> LiveServer:
    """``kiapi serve`` as a real process, as the README runs it, on a free loopback port."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    log = home / f"server-{port}.log"
    full_env = {**os.environ, "KIAPI_HOME": str(home), "TQDM_DISABLE": "1", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiapi_core.cli", "serve", "--port", str(port)],
        env=full_env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    server = LiveServer(f"http://127.0.0.1:{port}", proc, home, log)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"server did not start in {wait_s}s:\n{log.read_text()}")


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def start(
        env: dict[str, str] | None = None, home: Path | None = None, port: int | None = None
    ) -> LiveServer:
        server = start_server(home or tmp_path / "home", env, port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def wait_for(
    predicate: Callable[[], object], timeout: float = 30, interval: float = 0.05
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
