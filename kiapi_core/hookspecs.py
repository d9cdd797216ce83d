"""The kiapi plugin contract: every hook a plugin may implement.

A plugin is a module (or object) registered under the entry-point group ``kiapi`` whose
functions are decorated with :data:`kiapi_core.hookimpl` and named after a hook below. Each hook
is called once per plugin, inside its own error handling: a hook that raises disables that
plugin and is reported at ``GET /health`` and by ``kiapi plugins``, never taking the host down.
Hooks that take ``register`` hand the plugin a typed callback, so the host knows which plugin
sent what and can refuse collisions by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import click
    from starlette.routing import BaseRoute

    from kiapi_core.capabilities import Capability
    from kiapi_core.health import HealthCheck
    from kiapi_core.host import Host
    from kiapi_core.images.generator import ImageGenerator
    from kiapi_core.jobs.context import JobHandler
    from kiapi_core.models.spec import ModelSpec
    from kiapi_core.operations import Operation
    from kiapi_core.settings import Settings

hookspec = pluggy.HookspecMarker("kiapi")
hookimpl = pluggy.HookimplMarker("kiapi")


@hookspec
def register_capabilities(register: Callable[[Capability], None]) -> None:
    """Call ``register(Capability(name=..., domain=...))`` for each capability served.

    A capability owns the URL prefix ``/v1/{domain}/{name}/``; the host serves its OpenAPI
    document at ``/v1/{domain}/{name}/openapi.json``.
    """


@hookspec
def register_routes(settings: Settings) -> list[BaseRoute] | None:
    """Return Starlette ``Route``/``Mount`` objects to mount on the app.

    Paths must not collide with the host's or another plugin's: a collision refuses the
    later plugin with an error naming both.
    """


@hookspec
def register_models(register: Callable[[ModelSpec], None]) -> None:
    """Call ``register(ModelSpec(...))`` for each model this plugin can load.

    Specs carry memory estimates and a loader; the host decides when to load and evict.
    """


@hookspec
def register_openapi() -> dict[str, Any] | None:
    """Return an OpenAPI 3.1 fragment: ``{"paths": {...}, "components": {"schemas": {...}}}``.

    It is validated when loaded and merged into ``GET /openapi.json``. Components may
    ``$ref`` the host's (``Job``, ``JobStatus``, ``AsyncJobResponse``, ``Error``...).
    """


@hookspec
def register_job_handlers(register: Callable[[str, JobHandler], None]) -> None:
    """Call ``register(job_type, handler)``; ``handler(ctx) -> dict`` runs where jobs run (a thread of
    the worker process by default; never on the event loop).

    The returned dict becomes the job's ``result``. Handlers report progress and honour
    cancellation through ``ctx.progress(fraction, label)``.
    """


@hookspec
def register_operations(register: Callable[[Operation[Any]], None]) -> None:
    """Call ``register(Operation(...))`` for each job-running operation, declared once.

    The host builds from each its route, its OpenAPI path item and components, and registers
    its handler for its job type (the capability is registered with it if this plugin did not
    already). Use ``register_routes``/``register_openapi`` for anything else.
    """


@hookspec
def register_image_generators(register: Callable[[ImageGenerator], None]) -> None:
    """Call ``register(ImageGenerator(family, job_type, prepare))`` to fulfil the host's
    OpenAI-compatible ``POST /v1/images/generations`` for the models of one of your families.

    The host parses the OpenAI request, picks the generator by the requested model, and calls
    ``prepare(ImageRequest)`` for one job's params per image (raise ``ImageParamError(param,
    message)`` to refuse a value); it then runs the jobs and answers in OpenAI's shapes.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``kiapi`` command-line group (``@cli.command()``).

    Called when the plugin loads, like every hook: one that raises refuses the plugin, and a
    refused plugin has no commands. A name of the host's or of another plugin's is refused.
    """


@hookspec
def register_health_checks(register: Callable[[HealthCheck], None]) -> None:
    """Call ``register(HealthCheck(name, check))`` for what must work before a job can run
    (a native library imports, a device is there). ``check()`` returns a one-line detail or
    raises; ``python_check(code)`` runs Python in a subprocess, so heavy imports stay out of
    the server. Checks run on first use (``/health``, ``kiapi plugins``, ``kiapi status``,
    ``kiapi activate``), once per process; a failing one makes ``/health`` "degraded".
    """


@hookspec
def startup(host: Host) -> Awaitable[None] | None:
    """Called in the API server once it has started, before it serves or runs a job: open what
    the plugin's routes need. May be a coroutine function. A raising ``startup`` fails its
    plugin: reported at ``/health``, it is withdrawn (its routes, job handlers and image
    generators). Handlers in the worker process open their own resources (``ctx.data_dir``,
    models via ``ModelSpec.load``)."""


@hookspec
def shutdown(host: Host) -> Awaitable[None] | None:
    """Called as the API server stops, after its jobs stopped: close what ``startup`` opened.
    May be a coroutine function; errors are logged and do not stop the others."""
