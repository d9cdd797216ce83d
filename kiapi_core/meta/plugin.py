"""Default plugin ``kiapi.meta``: /health, /openapi.json, /v1/models and /v1/capabilities.

Registered through the same hooks as any third-party plugin (datasette's habit), so the host's
paths and schemas are merged and collision-checked like everyone else's.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from kiapi_core.health import results as check_results
from kiapi_core.hookspecs import hookimpl
from kiapi_core.host import host
from kiapi_core.jobs.schemas import AcceptedJob
from kiapi_core.jobs.submit import CANCEL_AFTER, KEEP_ALIVE, PRIORITY, SUBMIT_PARAMS
from kiapi_core.meta.residency import LoadRequest, load_model, model_row, run_load, unload_model
from kiapi_core.meta.schemas import CapabilityList, Error, Health, ModelInfo, ModelList
from kiapi_core.models.routing import LOAD_JOB
from kiapi_core.operations import STANDARD_ERRORS
from kiapi_core.settings import Settings
from kiapi_core.version import host_version
from kiapi_core.web.openapi import cached_fragment, json_response, operation
from kiapi_core.web.schema import components_from, ref


async def health(request: Request) -> Response:
    h = host(request)
    plugins = []
    unhealthy = pending = False
    for i in h.registry.plugins.values():
        # Started by the first request, on threads of their own: this one never waits.
        found = check_results(h.registry.checks.get(i.name, [])) if i.status == "loaded" else []
        unhealthy = unhealthy or any(c.status == "failed" for c in found)
        pending = pending or any(c.status == "pending" for c in found)
        plugins.append(
            {
                "name": i.name,
                "version": i.version,
                "status": i.status,
                "capabilities": i.capabilities,
                "errors": i.errors,
                "checks": [c.as_dict() for c in found],
            }
        )
    queue, worker = await h.jobs.call(h.jobs.queue_and_worker)
    models = h.models.summary()
    degraded = bool(h.registry.errors()) or unhealthy
    return JSONResponse(
        {
            "status": "degraded" if degraded else "ok",
            "readiness": readiness(h, degraded, pending, queue, models, worker),
            "version": host_version(),
            "uptime_s": round(time.time() - h.started_at, 3),
            "queue": queue,
            "models": models,
            "plugins": plugins,
            "worker": worker,
        }
    )


def readiness(
    h: Any,
    degraded: bool,
    checks_pending: bool,
    queue: dict[str, int],
    models: dict[str, float],
    worker: dict[str, Any],
) -> str:
    """Cog's states, coarser: starting / ready / busy / degraded (docs/jobs.md)."""
    live = worker.get("workers")
    if degraded or (worker.get("mode") == "celery" and not live):
        return "degraded"  # a plugin or check failed, or no kiapi worker is up
    first_load = models.get("loading", 0) and not sum(h.models.load_counts.values())
    if checks_pending or first_load:
        return "starting"
    slots = sum(int(w.get("concurrency") or 0) for w in live) if live else h.settings.workers
    return "busy" if queue["running"] >= max(1, slots) else "ready"


async def openapi(request: Request) -> Response:
    return Response(request.app.state.openapi_bytes, media_type="application/json")


def model_rows(request: Request) -> list[dict[str, Any]]:
    h = host(request)
    return [model_row(h, spec) for spec in h.registry.models]


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": model_rows(request)})


async def list_capabilities(request: Request) -> Response:
    h = host(request)
    paths = h.openapi()["paths"]
    rows = []
    for cap in h.registry.capabilities.values():
        prefix = cap.prefix + "/"
        plugin = h.registry.owner.get(("capability", cap.name), "?")
        operations = {
            path[len(prefix) :]: path
            for path, item in paths.items()
            if path.startswith(prefix) and "/" not in path[len(prefix) :] and "post" in item
        }
        rows.append(
            {
                "name": cap.name,
                "domain": cap.domain,
                "title": cap.title,
                "description": cap.description,
                "plugin": plugin,
                "openapi": f"{cap.prefix}/openapi.json",
                "operations": operations,
                # The plugin's models of the capability's domain: what its `model` field takes.
                "models": [
                    m.key
                    for m in h.registry.models
                    if m.domain == cap.domain
                    and h.registry.owner.get(("model", f"{m.family}/{m.name.lower()}")) == plugin
                ],
            }
        )
    return JSONResponse({"object": "list", "data": rows})


MODEL_PATH_PARAMS: list[dict[str, Any]] = [
    {"name": n, "in": "path", "required": True, "schema": {"type": "string"}, "description": d}
    for n, d in (("family", "The model's family."), ("name", "Its name or an alias."))
]


def fragment() -> dict[str, Any]:
    return {
        "paths": {
            "/health": {
                "get": operation(
                    "Liveness, version, queue, and plugin load errors",
                    {"200": json_response(ref("Health"), "Host status.")},
                )
            },
            "/openapi.json": {
                "get": operation(
                    "This document",
                    {
                        "200": {
                            "description": "OpenAPI 3.1 of the host and every plugin.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                )
            },
            "/v1/models": {
                "get": operation(
                    "Every plugin's models with residency and activation",
                    {"200": json_response(ref("ModelList"), "All models.")},
                    tag="models",
                )
            },
            "/v1/models/{family}/{name}/load": {
                "post": {
                    **operation(
                        "Load a model ahead, as a `kiapi.load` job (202 with the Job)",
                        {
                            "202": json_response(ref("AcceptedJob"), "The load job, queued."),
                            "404": json_response(ref("Error"), "No such model."),
                            "413": json_response(ref("Error"), STANDARD_ERRORS["413"]),
                            "415": json_response(ref("Error"), STANDARD_ERRORS["415"]),
                            "422": json_response(ref("Error"), "A bad body or header."),
                            "429": json_response(ref("Error"), STANDARD_ERRORS["429"]),
                            "503": json_response(ref("Error"), "No worker runs load jobs."),
                        },
                        tag="models",
                    ),
                    "parameters": [
                        *MODEL_PATH_PARAMS,
                        *(SUBMIT_PARAMS[n] for n in (KEEP_ALIVE, PRIORITY, CANCEL_AFTER)),
                    ],
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": ref("LoadRequest")}},
                    },
                }
            },
            "/v1/models/{family}/{name}/resident": {
                "delete": {
                    **operation(
                        "Unload a model now, wherever it is resident",
                        {
                            "200": json_response(ref("ModelInfo"), "The model, not resident."),
                            "404": json_response(ref("Error"), "No such model."),
                            "409": json_response(ref("Error"), "A job is using it."),
                            "504": json_response(ref("Error"), "Not unloaded in time."),
                        },
                        tag="models",
                    ),
                    "parameters": MODEL_PATH_PARAMS,
                }
            },
            "/v1/capabilities": {
                "get": operation(
                    "Every capability with its operations (how clients find `generate`)",
                    {"200": json_response(ref("CapabilityList"), "All capabilities.")},
                    tag="models",
                )
            },
        },
        "components": {
            "schemas": components_from(
                Error, Health, ModelInfo, ModelList, CapabilityList, LoadRequest, AcceptedJob
            )
        },
    }


@hookimpl
def register_routes(settings: Settings) -> list[BaseRoute]:
    return [
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/capabilities", list_capabilities, methods=["GET"]),
        Route("/v1/models/{family}/{name}/load", load_model, methods=["POST"]),
        Route("/v1/models/{family}/{name}/resident", unload_model, methods=["DELETE"]),
    ]


@hookimpl
def register_job_handlers(register: Any) -> None:
    register(LOAD_JOB, run_load)


@hookimpl
def register_openapi() -> dict[str, Any]:
    return cached_fragment("kiapi.meta", fragment, packages=["kiapi_core"])
