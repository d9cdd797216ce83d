"""Shared fixtures: the echo test plugin pip-installed for the session, apps, live servers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import LiveServer, install_plugin, installed, start_server, uninstall_plugin
from starlette.testclient import TestClient

from kiapi_core.app import create_app
from kiapi_core.settings import Settings

# CI has every tool a test needs (a browser, redis-server, root for tmpfs): there a skip means
# a test that silently did not run, so the session fails (.ci/run sets this).
NO_SKIPS = os.environ.get("KIAPI_TESTS_NO_SKIPS") == "1"
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if NO_SKIPS and _skipped and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if NO_SKIPS and _skipped:
        terminalreporter.write_line(
            f"KIAPI_TESTS_NO_SKIPS=1: {len(_skipped)} skipped, so the run fails:"
            f" {', '.join(_skipped[:20])}",
            red=True,
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
    was_installed = installed("kiapi-echo")
    install_plugin("echo")
    yield
    # Leave the environment as found: another pytest session sharing this venv may be
    # relying on the plugin right now.
    if not was_installed:
        uninstall_plugin("echo")


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
