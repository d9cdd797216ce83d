"""kiapi-rules: a test plugin that follows every plugin rule, or breaks the ones named.

``RULES_PLUGIN_MODE`` (comma-separated) names the rules to break; the hooks read it at each
call, so one installed copy serves every test (in this process and in the worker process,
which inherits the environment). Unset, the plugin is well-behaved: one capability
(``test/rules``), one model, a route that runs its job with a raw ``text/plain`` answer, an
image generator, a CLI command and a passing health check. The job's params pick how its
handler behaves (files saved, an HTTP failure, a crash).
"""

from __future__ import annotations

import os
import time
from typing import Any

import click
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from kiapi_core import Capability, ModelSpec, Weights, hookimpl
from kiapi_core.health import HealthCheck, python_check
from kiapi_core.images import ImageGenerator
from kiapi_core.images.generator import ImageRequest
from kiapi_core.jobs.context import JobContext
from kiapi_core.jobs.errors import JobFailed
from kiapi_core.jobs.respond import respond_with_job
from kiapi_core.web.errors import ApiError

PREFIX = "/v1/test/rules"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def _modes() -> set[str]:
    return {m.strip() for m in os.environ.get("RULES_PLUGIN_MODE", "").split(",") if m.strip()}


def _load(weights_dir: Any, options: Any) -> object:
    return object()


SPEC = ModelSpec(
    name="rules-1", family="rules", domain="test", load=_load, aliases=("rules",), default=True
)


def _fetch() -> Any:
    raise RuntimeError("kiapi-rules has nothing to download")


def _validate(folder: Any) -> None:
    import kiapi_rules_native  # type: ignore[import-not-found]  # noqa: F401


HEAVY = ModelSpec(
    name="rules-heavy",
    family="rules-heavy",
    domain="test",
    load=_load,
    weights=Weights(source="nowhere", download=_fetch, validate=_validate),
)


def run_rules(ctx: JobContext) -> dict[str, Any]:
    params = ctx.params
    for _ in range(int(params.get("sleep", 0) * 10)):
        time.sleep(0.1)
        ctx.progress(None, "sleeping")
    if params.get("fail_status"):
        raise JobFailed(params["fail_status"], params.get("detail", "the card was not found"))
    if params.get("api_error"):
        raise ApiError(params["api_error"], "no such card")
    if params.get("crash"):
        with (ctx.data_dir / "no-such-dir" / "card.txt").open() as fh:  # raises, naming the path
            fh.read()
    saved = int(params.get("save", 1))
    for i in range(saved):
        if params.get("image"):
            ctx.save_file(PNG, filename=f"image-{i}.png", content_type="image/png")
        else:
            ctx.save_file(b"rules ok", filename=f"rules-{i}.txt", content_type="text/plain")
    return {"saved": saved}


async def run(request: Request) -> Response:
    body = await request.json()
    mode = body.pop("mode", "sync")
    return await respond_with_job(
        request, job_type="rules", params=body, mode=mode, media_type="text/plain"
    )


async def orphan(request: Request) -> Response:
    return await respond_with_job(request, job_type="rules-gone", params={}, mode="async")


async def _ok(request: Request) -> Response:
    return PlainTextResponse("rules answered")


def prepare(request: ImageRequest) -> list[dict[str, Any]]:
    return [{"image": True, "save": int(request.extra.get("save", 1))}] * request.n


@hookimpl
def register_capabilities(register: Any) -> None:
    register(Capability(name="rules", domain="test", title="Rules"))


@hookimpl
def register_models(register: Any) -> None:
    register(SPEC)
    register(HEAVY)
    if "alias-clash" in _modes():
        # Another family, but an alias the echo plugin's model already answers to.
        register(
            ModelSpec(name="card", family="cards", domain="test", load=_load, aliases=("echo",))
        )
    if "bad-name" in _modes():
        register(ModelSpec(name="Text Card!", family="cards", domain="test", load=_load))


@hookimpl
def register_job_handlers(register: Any) -> None:
    register("rules", run_rules)


@hookimpl
def register_image_generators(register: Any) -> None:
    register(ImageGenerator(family="rules", job_type="rules", prepare=prepare))


_EXTRA_ROUTES = {
    "steal-param": ("/v1/text/{cap}/run", "POST"),
    "steal-path": ("/v1/{rest:path}", "GET"),
    "inside-other": ("/v1/text/echo/extra", "POST"),
    "inside-host": ("/v1/jobs/{job_id}/textcard", "GET"),
    "shadow-document": (PREFIX + "/{page}", "GET"),
}


@hookimpl
def register_routes() -> list[Route]:
    routes = [
        Route(f"{PREFIX}/run", run, methods=["POST"]),
        Route(f"{PREFIX}/orphan", orphan, methods=["POST"]),
    ]
    for mode, (path, method) in _EXTRA_ROUTES.items():
        if mode in _modes():
            routes.append(Route(path, _ok, methods=[method]))
    if "undocumented" in _modes():
        routes.append(Route(f"{PREFIX}/hidden", _ok, methods=["GET"]))
    return routes


def _op(summary: str) -> dict[str, Any]:
    return {"summary": summary, "responses": {"200": {"description": "Done."}}}


@hookimpl
def register_openapi() -> dict[str, Any]:
    modes = _modes()
    paths: dict[str, Any] = {
        f"{PREFIX}/run": {"post": _op("Run the rules job")},
        f"{PREFIX}/orphan": {"post": _op("Queue a job no plugin handles")},
    }
    # The extra routes are documented, so that only the rule under test is broken.
    for mode, (path, method) in _EXTRA_ROUTES.items():
        if mode in modes:
            paths[path.replace(":path", "")] = {method.lower(): _op("Extra")}
    if "doc-extra" in modes:
        paths["/v1/text/echo/secret"] = {"post": _op("Documented, served by no route")}
    if "doc-method" in modes:
        paths[f"{PREFIX}/run"]["get"] = _op("Documented, but the route serves POST only")
    schemas: dict[str, Any] = {"RulesOut": {"type": "object"}}
    if "bad-doc" in modes:
        paths[f"{PREFIX}/run"]["description"] = 42
        schemas["RulesOut"] = {"type": "boolian"}
    return {"paths": paths, "components": {"schemas": schemas}}


@hookimpl
def register_commands(cli: click.Group) -> None:
    if "commands-raise" in _modes():
        raise RuntimeError("commands exploded")

    @cli.command(name="echo" if "command-clash" in _modes() else "rules-hello")
    def hello() -> None:
        """Say hello (from the kiapi-rules plugin)."""
        click.echo("hello from rules")


@hookimpl
def register_health_checks(register: Any) -> None:
    if "check-fails" in _modes():
        # What a native library that cannot load looks like: the import fails.
        register(HealthCheck("native", python_check("import kiapi_rules_native")))
    else:
        register(HealthCheck("native", python_check("print('rules native ok')")))
