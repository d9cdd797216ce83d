"""Plugins' startup/shutdown hooks: run around the server's life, each in its own error handling;
a plugin whose startup fails is withdrawn whole."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from helpers import documented
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from kiapi_core import Capability, hookimpl
from kiapi_core.app import create_app
from kiapi_core.jobs.context import JobContext
from kiapi_core.jobs.respond import respond_with_job
from kiapi_core.settings import Settings

EVENTS: list[str] = []


class Opens:
    """Opens a resource at startup (async) and closes it at shutdown (sync)."""

    @hookimpl
    def register_capabilities(self, register: Callable[[Capability], None]) -> None:
        register(Capability(name="opens", domain="test"))

    @hookimpl
    async def startup(self, host: Any) -> None:
        assert host.settings.home.is_dir()  # the host's parts are there
        EVENTS.append(f"opens started ({type(host).__name__})")

    @hookimpl
    def shutdown(self, host: Any) -> None:
        EVENTS.append("opens stopped")


def _ping(request: Request) -> Response:
    return PlainTextResponse("pong")


async def _run(request: Request) -> Response:
    return await respond_with_job(request, job_type="fails-to-open", params={})


def _job(ctx: JobContext) -> dict[str, Any]:
    return {"ran": True}


class FailsToOpen:
    """A plugin whose startup raises: none of its routes or jobs may stay."""

    routes = [
        Route("/v1/test/fails/ping", _ping, methods=["GET"]),
        Route("/v1/test/fails/run", _run, methods=["POST"]),
    ]

    @hookimpl
    def register_capabilities(self, register: Callable[[Capability], None]) -> None:
        register(Capability(name="fails", domain="test"))

    @hookimpl
    def register_routes(self) -> list[Route]:
        return self.routes

    @hookimpl
    def register_openapi(self) -> dict[str, Any]:
        return documented(*self.routes)

    @hookimpl
    def register_job_handlers(self, register: Callable[[str, Any], None]) -> None:
        register("fails-to-open", _job)

    @hookimpl
    def startup(self, host: Any) -> None:
        raise ConnectionError("the card database is unreachable")


def test_startup_and_shutdown_run_around_the_server(make_settings: Callable[..., Settings]) -> None:
    EVENTS.clear()
    app = create_app(make_settings(), extra_plugins=[("opens", Opens())])
    assert EVENTS == []  # nothing at build time
    with TestClient(app) as c:
        assert EVENTS == ["opens started (Host)"]
        assert c.get("/health").json()["status"] == "ok"
    assert EVENTS == ["opens started (Host)", "opens stopped"]


def test_a_plugin_whose_startup_raises_is_withdrawn_whole(
    make_settings: Callable[..., Settings],
) -> None:
    EVENTS.clear()
    app = create_app(
        make_settings(),
        extra_plugins=[("fails", FailsToOpen()), ("opens", Opens())],
    )
    with TestClient(app) as c:
        health = c.get("/health").json()
        assert health["status"] == "degraded"
        fails = next(p for p in health["plugins"] if p["name"] == "fails")
        assert fails["status"] == "failed"
        assert "the card database is unreachable" in " ".join(fails["errors"])
        # Its routes are gone, and its job type runs nowhere.
        assert c.get("/v1/test/fails/ping").status_code == 404
        assert c.post("/v1/test/fails/run", json={}).status_code == 404
        h = c.app.state.kiapi  # type: ignore[attr-defined]
        assert "fails-to-open" not in h.registry.handlers
        assert h.jobs.handled is not None and "fails-to-open" not in h.jobs.handled
        # The others started and serve as before.
        assert "opens started (Host)" in EVENTS
        assert c.get("/v1/jobs").status_code == 200
