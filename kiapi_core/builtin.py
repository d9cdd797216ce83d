"""The host's own plugin: /health, /openapi.json, /v1/models, /v1/capabilities, jobs, files,
the OpenAI-compatible /v1/images/generations and the /playground page.

Registered through the same hooks as any third-party plugin (datasette's habit), so the host's
paths and schemas are merged and collision-checked like everyone else's.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from kiapi_core.files.routes import routes as file_routes
from kiapi_core.files.schemas import FileInfo, FileList
from kiapi_core.hookspecs import hookimpl
from kiapi_core.host import host
from kiapi_core.images.openapi import fragment as images_fragment
from kiapi_core.images.routes import routes as image_routes
from kiapi_core.jobs.routes import routes as job_routes
from kiapi_core.jobs.schemas import AsyncJobResponse, Job, JobList
from kiapi_core.playground import fragment as playground_fragment
from kiapi_core.playground import routes as playground_routes
from kiapi_core.settings import Settings
from kiapi_core.web.openapi import cached_fragment, error_response, json_response
from kiapi_core.web.schema import components_from, ref


class Error(BaseModel):
    detail: Any = Field(description="What went wrong: a message, or a list of {loc, msg, type}.")


class PluginStatus(BaseModel):
    name: str
    version: str | None = None
    status: str = Field(description="loaded, failed or disabled.")
    capabilities: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)


class Health(BaseModel):
    status: str = Field(description="ok, or degraded when a plugin failed to load.")
    version: str
    uptime_s: float
    queue: dict[str, int] = Field(description="Jobs waiting and running.")
    models: dict[str, float] = Field(
        description="Resident and transient model counts, memory used and budget (GB)."
    )
    plugins: list[PluginStatus]
    worker: dict[str, Any] = Field(
        description=(
            "How jobs run: `mode` process (with the worker's `pid`, null until the first job, "
            "`restarts` after crashes, planned `recycles` and its resident memory `rss_mb`), "
            "thread (with the server's `rss_mb`), or celery (with the live `workers`)."
        )
    )


class ModelInfo(BaseModel):
    """An OpenAI Model object (`id`, `object`, `created`, `owned_by`) with kiapi's fields."""

    id: str = Field(
        description="`family/name`; also accepted as `model` by /v1/images/generations."
    )
    object: str = "model"
    created: int = Field(description="Unix time this server started serving it.")
    owned_by: str = Field(description="The plugin that serves it.")
    name: str
    family: str
    domain: str
    aliases: list[str] = Field(default_factory=list)
    default: bool = False
    features: list[str] = Field(default_factory=list)
    memory_gb: float = Field(description="Estimated memory when resident.")
    active: bool = Field(description="Weights are available locally (or none are needed).")
    resident: bool = Field(description="Loaded in memory now.")
    loads: int = Field(description="Times loaded as a resident model since the server started.")
    transient_loads: int = Field(description="One-off transient loads (e.g. a quantize override).")


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelInfo]


class CapabilityInfo(BaseModel):
    name: str = Field(description="Capability name, e.g. the `--capability` of `kiapi generate`.")
    domain: str = Field(description="Its domain: the capability owns `/v1/{domain}/{name}/`.")
    title: str
    description: str
    plugin: str = Field(description="The plugin that serves it.")
    openapi: str = Field(description="Path of the capability's own OpenAPI document.")
    operations: dict[str, str] = Field(
        description="Its POST operations by last path segment, e.g. `generate`, `validate`."
    )
    models: list[str] = Field(description="Model ids (`family/name`) of its family.")


class CapabilityList(BaseModel):
    object: str = "list"
    data: list[CapabilityInfo]


async def health(request: Request) -> Response:
    h = host(request)
    plugins = [
        {
            "name": i.name,
            "version": i.version,
            "status": i.status,
            "capabilities": i.capabilities,
            "errors": i.errors,
        }
        for i in h.registry.plugins.values()
    ]
    return JSONResponse(
        {
            "status": "degraded" if h.registry.errors() else "ok",
            "version": h.registry.plugins["kiapi"].version,
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
        rows.append(
            {
                "id": spec.key,
                "object": "model",
                "created": int(h.started_at),
                "owned_by": owner,
                **spec.public(),
                "memory_gb": spec.memory_gb,
                "active": spec.weights is None or h.weights.path_for(spec) is not None,
                "resident": spec.key in resident,
                "loads": sum(
                    n for k, n in h.models.load_counts.items() if k.split("[")[0] == spec.key
                ),
                "transient_loads": h.models.transient_counts[spec.key],
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


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "tags": [extra.pop("tag", "host")], "responses": responses, **extra}


def _path_param(name: str, pattern: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": f"Looks like `{pattern}`.",
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_PAGING = [
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}, "Page size."),
    _query(
        "cursor",
        {"type": "string", "pattern": "^[0-9]{1,18}$"},
        "`next_cursor` of the previous page.",
    ),
]
_JOB = [_path_param("job_id", "job_0123456789abcdef")]
_FILE = [_path_param("file_id", "file_0123456789abcdef")]
E404 = error_response("No such id (ids are checked by pattern before any lookup).")
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["progress", "end"]},
        "id": {"type": "string", "description": "Increases by one per event."},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": ref("Job"),
        },
    },
    "required": ["event", "data"],
}
E422 = error_response("A parameter failed validation; `detail` lists each field, rule and message.")


def host_fragment() -> dict[str, Any]:
    schemas = components_from(
        Error,
        Health,
        Job,
        JobList,
        AsyncJobResponse,
        FileInfo,
        FileList,
        ModelList,
        CapabilityList,
    )
    jobs_tag, files_tag = "jobs", "files"
    return {
        "paths": {
            "/health": {
                "get": _op(
                    "Liveness, version, queue, and plugin load errors",
                    {"200": json_response(ref("Health"), "Host status.")},
                )
            },
            "/openapi.json": {
                "get": _op(
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
                "get": _op(
                    "Every plugin's models with residency and activation",
                    {"200": json_response(ref("ModelList"), "All models.")},
                    tag="models",
                )
            },
            "/v1/capabilities": {
                "get": _op(
                    "Every capability with its operations (how clients find `generate`)",
                    {"200": json_response(ref("CapabilityList"), "All capabilities.")},
                    tag="models",
                )
            },
            "/v1/jobs": {
                "get": _op(
                    "List jobs, newest first",
                    {"200": json_response(ref("JobList"), "A page of jobs."), "422": E422},
                    tag=jobs_tag,
                    parameters=[
                        _query(
                            "status",
                            {
                                "type": "string",
                                "enum": ["queued", "running", "succeeded", "failed", "canceled"],
                            },
                            "Only jobs in this state.",
                        ),
                        _query("type", {"type": "string"}, "Only jobs of this type."),
                        *_PAGING,
                    ],
                )
            },
            "/v1/jobs/{job_id}": {
                "get": _op(
                    "A job's status, progress, result and artifacts",
                    {"200": json_response(ref("Job"), "The job."), "404": E404},
                    tag=jobs_tag,
                    parameters=_JOB,
                ),
                "delete": _op(
                    "Cancel a job",
                    {
                        "200": json_response(ref("Job"), "The job was queued and is now canceled."),
                        "202": json_response(
                            ref("Job"),
                            "The job is running; it stops at its next step and ends canceled.",
                        ),
                        "404": E404,
                        "409": error_response("The job already finished; `status` says how."),
                    },
                    tag=jobs_tag,
                    parameters=_JOB,
                ),
            },
            "/v1/jobs/{job_id}/events": {
                "get": _op(
                    "Follow a job as Server-Sent Events",
                    {
                        "200": {
                            "description": (
                                "`event: progress` with the Job JSON at each change,"
                                " then `event: end` at a terminal state."
                            ),
                            # The schema of one event (how SSE media types are read, cf.
                            # OpenAPI 3.2 itemSchema): `data` holds the Job as JSON.
                            "content": {"text/event-stream": {"schema": _SSE_EVENT}},
                        },
                        "404": E404,
                    },
                    tag=jobs_tag,
                    parameters=_JOB,
                )
            },
            "/v1/files": {
                "get": _op(
                    "List files, newest first",
                    {"200": json_response(ref("FileList"), "A page of files."), "422": E422},
                    tag=files_tag,
                    parameters=[
                        _query(
                            "job_id",
                            {"type": "string", "pattern": "^job_[0-9a-f]{16}$"},
                            "Only files produced by this job.",
                        ),
                        *_PAGING,
                    ],
                ),
                "post": _op(
                    "Upload a file (multipart/form-data, field `file`)",
                    {
                        "201": json_response(ref("FileInfo"), "Stored."),
                        "413": error_response("Larger than KIAPI_MAX_UPLOAD_BYTES."),
                        "415": error_response("Not multipart/form-data."),
                        "422": E422,
                        "503": error_response(
                            "The files directory refused the write (not writable, full)."
                        ),
                    },
                    tag=files_tag,
                    requestBody={
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["file"],
                                    "properties": {"file": {"type": "string", "format": "binary"}},
                                }
                            }
                        },
                    },
                ),
            },
            "/v1/files/{file_id}": {
                "get": _op(
                    "File metadata",
                    {"200": json_response(ref("FileInfo"), "Metadata."), "404": E404},
                    tag=files_tag,
                    parameters=_FILE,
                ),
                "delete": _op(
                    "Delete a file",
                    {
                        "200": json_response(
                            {
                                "type": "object",
                                "properties": {
                                    "id": {"type": "string"},
                                    "deleted": {"type": "boolean"},
                                },
                                "required": ["id", "deleted"],
                            },
                            "Deleted.",
                        ),
                        "404": E404,
                    },
                    tag=files_tag,
                    parameters=_FILE,
                ),
            },
            "/v1/files/{file_id}/download": {
                "get": _op(
                    "Download a file's bytes (streamed, ETag, Range)",
                    {
                        "200": {
                            "description": (
                                "The content with its Content-Type and Content-Disposition."
                            ),
                            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                        },
                        "206": {
                            "description": "The requested byte range.",
                            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                        },
                        "304": {"description": "Unchanged (If-None-Match matched the ETag)."},
                        "404": E404,
                        "410": error_response("The content is gone from disk."),
                        "416": error_response(
                            "The Range starts past the end; Content-Range has the size."
                        ),
                    },
                    tag=files_tag,
                    parameters=_FILE,
                )
            },
        },
        "components": {"schemas": schemas},
    }


@hookimpl
def register_routes(settings: Settings) -> list[BaseRoute]:
    return [
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/capabilities", list_capabilities, methods=["GET"]),
        *job_routes,
        *file_routes,
        *image_routes,
        *playground_routes,
    ]


@hookimpl
def register_openapi() -> dict[str, Any]:
    return cached_fragment("kiapi", _build_openapi, packages=["kiapi_core"])


def _build_openapi() -> dict[str, Any]:
    doc = host_fragment()
    for part in (images_fragment(), playground_fragment()):
        doc["paths"].update(part["paths"])
        doc["components"]["schemas"].update(part.get("components", {}).get("schemas", {}))
        doc.setdefault("tags", []).extend(part.get("tags", []))
    return doc
