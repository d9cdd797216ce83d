"""Commands that run a server: ``kiapi serve`` (the API) and ``kiapi worker`` (scale-out)."""

from __future__ import annotations

import sys
from typing import Any

import click

from kiapi_core.cli.startup import gc_paused, registry_from, settings_from

__all__ = ["serve", "worker"]


@click.command()
@click.option("--host", default=None, help="Bind address (default 127.0.0.1, KIAPI_HOST).")
@click.option("--port", type=int, default=None, help="Port (default 8000, KIAPI_PORT).")
@click.option(
    "--workers", type=int, default=None, help="Model slots: jobs run at once (KIAPI_WORKERS)."
)
def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Start the HTTP server."""
    import logging

    with gc_paused():
        import uvicorn

        from kiapi_core.app import create_app
        from kiapi_core.web.protocol import protocol_class

        settings = settings_from(host=host, port=port, workers=workers)
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        from kiapi_core.plugins import PluginError

        if settings.api_key is None and not _loopback(settings.host):
            logging.getLogger("kiapi").warning(
                "binding %s without KIAPI_API_KEY: anyone who can reach this port can run jobs"
                " and read every file; set KIAPI_API_KEY (see SECURITY.md)",
                settings.host,
            )
        if settings.backend == "embedded":
            from kiapi_core.state.homelock import HomeLocked, lock_home

            try:
                lock_home(settings.home)  # held until the process exits
            except HomeLocked as exc:
                raise click.ClickException(str(exc)) from None
        try:
            app = create_app(settings)
        except PluginError as exc:
            raise click.ClickException(str(exc)) from None
    if settings.worker_mode == "thread":
        # A model thread running Python holds the GIL for up to the switch interval (5 ms by
        # default) before the event loop gets it back; 1 ms keeps status calls quick mid-run.
        sys.setswitchinterval(0.001)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=5,
        http=protocol_class(settings),
        ws=_websocket_protocol(),
    )


def _websocket_protocol() -> Any:
    """uvicorn's ``ws`` choice: its "auto" implementation, imported at the first upgrade.

    ``ws="auto"`` imports wsproto (and h11) or websockets while the server starts, ~17 ms of a
    ~0.3 s cold start, though most servers never see a WebSocket. uvicorn only ever calls the
    class with keyword arguments when a request upgrades, so a factory stands in for it.
    """
    import importlib.util

    if not any(importlib.util.find_spec(lib) for lib in ("websockets", "wsproto")):
        return "none"  # what "auto" resolves to then: upgrade requests are served as HTTP

    def protocol(**kwargs: Any) -> Any:
        from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

        assert AutoWebSocketsProtocol is not None
        return AutoWebSocketsProtocol(**kwargs)

    return protocol


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: assume it may be reachable from elsewhere


def _split(values: tuple[str, ...]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


@click.command()
@click.option(
    "--queues",
    "-Q",
    multiple=True,
    help="Job types to take (comma-separated or repeated; default: every type whose plugin is"
    " loaded and whose model is active on this machine).",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Model slots: jobs run at once, each on its own long-lived thread.",
)
@click.option("--name", "-n", default=None, help="Node name (default kiapi<pid>@<hostname>).")
@click.option("--loglevel", "-l", default=None, help="Log level (default KIAPI_LOG_LEVEL).")
def worker(
    queues: tuple[str, ...], concurrency: int, name: str | None, loglevel: str | None
) -> None:
    """Run jobs for API nodes started with KIAPI_BACKEND=celery (see docs/scale-out.md).

    Needs KIAPI_REDIS_URL (the same Redis as the API nodes), KIAPI_FILES_DIR (the same shared
    directory) and `pip install 'kiapi-core[celery]'`. SIGTERM (or Ctrl-C) lets running jobs
    finish first; SIGQUIT (or a second Ctrl-C) stops at their next step and hands them back to
    their queues, where another worker runs them.
    """
    import logging

    settings = settings_from()
    if settings.redis_url is None:
        raise click.ClickException(
            "kiapi worker needs KIAPI_REDIS_URL, the Redis the API nodes use"
            " (e.g. redis://10.0.0.5:6379/0)"
        )
    try:
        from kiapi_core.runtime.celery.worker import run_worker
    except ImportError as exc:
        raise click.ClickException(
            f"the celery backend is not installed ({exc}); run: pip install 'kiapi-core[celery]'"
        ) from None
    level = (loglevel or settings.log_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = registry_from(settings)
    try:
        code = run_worker(
            settings,
            registry,
            queues=_split(queues) or None,
            concurrency=concurrency,
            name=name,
            loglevel=level,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)
