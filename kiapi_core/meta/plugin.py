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
from kiapi_core.meta.schemas import CapabilityList, Error, Health, ModelList
from kiapi_core.models.weights import activation_command
from kiapi_core.settings import Settings
from kiapi_core.version import host_version
from kiapi_core.web.openapi import cached_fragment, json_response, operation
from kiapi_core.web.schema import components_from, ref


async def health(request: Request) -> Response:
    h = host(request)
    plugins = []
    unhealthy = False
    for i in h.registry.plugins.values():
        # Started by the first request, on threads of their own: this one never waits.
        found = check_results(h.registry.checks.get(i.name, [])) if i.status == "loaded" else []
        unhealthy = unhealthy or any(c.status == "failed" for c in found)
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
    return JSONResponse(
        {
            "status": "degraded" if h.registry.errors() or unhealthy else "ok",
            "version": host_version(),
            "uptime_s": round(time.time() - h.started_at, 3),
            "queue": await h.jobs.queue_counts(),
            "models": h.models.summary(),
            "plugins": plugins,
            "worker": h.jobs.dispatcher.describe(),
        }
    )


async def openapi(request: Request) -> Response:
    return Response(request.app.state.openapi_bytes, media_type="application/json")


def model_rows(request: Request) -> list[dict[str, Any]]:
    h = host(request)
    resident = {r["key"].split("[")[0] for r in h.models.status() if not r["transient"]}
    rows = []
    for spec in h.registry.models:
        owner = h.registry.owner.get(("model", f"{spec.family}/{spec.name.lower()}"), "?")
        active = spec.weights is None or h.weights.path_for(spec) is not None
        rows.append(
            {
                "id": spec.key,
                "object": "model",
                "created": int(h.started_at),
                "owned_by": owner,
                **spec.public(),
                "memory_gb": spec.memory_gb,
                "active": active,
                "resident": spec.key in resident,
                "loads": sum(
                    n for k, n in h.models.load_counts.items() if k.split("[")[0] == spec.key
                ),
                "transient_loads": h.models.transient_counts[spec.key],
                "activate_command": None if active else activation_command(spec),
            }
        )
    return rows


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
            "/v1/capabilities": {
                "get": operation(
                    "Every capability with its operations (how clients find `generate`)",
                    {"200": json_response(ref("CapabilityList"), "All capabilities.")},
                    tag="models",
                )
            },
        },
        "components": {"schemas": components_from(Error, Health, ModelList, CapabilityList)},
    }


@hookimpl
def register_routes(settings: Settings) -> list[BaseRoute]:
    return [
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/capabilities", list_capabilities, methods=["GET"]),
    ]


@hookimpl
def register_openapi() -> dict[str, Any]:
    return cached_fragment("kiapi.meta", fragment, packages=["kiapi_core"])
