"""The ``kiapi worker`` command. Imports nothing but click until it runs (CLI start-up stays quick)."""

from __future__ import annotations

import sys

import click


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
    directory) and `pip install 'kiapi[celery]'`. SIGTERM (or Ctrl-C) lets running jobs finish
    first; SIGQUIT (or a second Ctrl-C) stops at their next step and hands them back to their
    queues, where another worker runs them.
    """
    import logging

    from kiapi_core.cli import _registry, _settings

    settings = _settings()
    if settings.redis_url is None:
        raise click.ClickException(
            "kiapi worker needs KIAPI_REDIS_URL, the Redis the API nodes use"
            " (e.g. redis://10.0.0.5:6379/0)"
        )
    try:
        from kiapi_core.backends.worker import run_worker
    except ImportError as exc:
        raise click.ClickException(
            f"the celery backend is not installed ({exc}); run: pip install 'kiapi[celery]'"
        ) from None
    level = (loglevel or settings.log_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = _registry(settings)
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
