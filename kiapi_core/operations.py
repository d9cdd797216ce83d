"""An operation declared once: the route, its OpenAPI and its job handler come from it.

A plugin registers :class:`Operation` objects through the ``register_operations`` hook. From
each the host builds the Starlette route (body read with ``read_json``, then
``respond_with_job``: sync/async, ``Accept`` negotiation, 202, 429, 504...), the OpenAPI path
item with the host's standard error responses, the components generated from the request and
result models, and the job-handler registration. Hand-written routes and fragments stay
possible next to it for anything that is not "run a job from a JSON body".
"""

from __future__ import annotations

import copy
import inspect
import re
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kiapi_core.capabilities import Capability
from kiapi_core.jobs.context import JobContext, JobHandler

Req = TypeVar("Req", bound=BaseModel)

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_PATH = re.compile(r"^[a-z0-9][a-z0-9_.-]*(/[a-z0-9][a-z0-9_.-]*)*$")
_MEDIA_TYPE = re.compile(r"^[a-z0-9][a-z0-9.+-]*/[a-z0-9][a-z0-9.+-]*$")
_STATUS = re.compile(r"^[1-5][0-9]{2}$")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")

# The host's standard errors for a job-running operation: what read_json and respond_with_job
# can answer. 401 is added by the app itself when KIAPI_API_KEY is set.
STANDARD_ERRORS = {
    "400": "The request is invalid for this operation (a check or the handler refused it);"
    " `detail` says why.",
    "406": "Accept allows none of the media types this operation answers with.",
    "409": "The job was canceled while the request waited (by request, or its Cancel-After"
    " deadline passed).",
    "413": "Body larger than KIAPI_MAX_BODY_BYTES.",
    "415": "Body is not application/json.",
    "422": "A field or header failed validation; `detail` names each field and rule (also: an"
    " Idempotency-Key sent before with a different request).",
    "429": "Queue full (KIAPI_MAX_QUEUE); see Retry-After.",
    "500": "The job failed; the job's error says why.",
    "503": "The server cannot run this now (e.g. a model's weights are not activated);"
    " `detail` says what to do.",
    "504": "Sync wait exceeded KIAPI_SYNC_TIMEOUT_S; the body names the job id, which keeps"
    " running.",
}
_RAW_HEADERS = {
    "X-Kiapi-File-Id": {
        "description": "The artifact's file id (raw-bytes answers).",
        "schema": {"type": "string"},
    },
    "X-Kiapi-Job-Id": {
        "description": "The job's id (raw-bytes answers).",
        "schema": {"type": "string"},
    },
}


@dataclass(frozen=True)
class Operation(Generic[Req]):
    """One job-running HTTP operation, ``{method} /v1/{domain}/{capability}/{path}``.

    The route reads the body as ``request`` (415/422 naming the field), turns it into the
    job's params with ``prepare(body, request)`` (sync or async; raise ``ApiError`` for a 4xx
    or 503, e.g. an unknown model) or, without ``prepare``, ``body.model_dump(mode="json")``
    minus ``mode`` (and ``webhook`` / ``webhook_events_filter``, which name the job's webhook
    when the model has them); then runs a ``job_type`` job (default: the capability's name) through
    ``respond_with_job``, sync or async as the body's ``mode`` field says (always sync when the
    model has none; a ``keep_alive`` field is the job's keep-alive, as X-Kiapi-Keep-Alive).
    ``handler(ctx)`` is registered for ``job_type``; what it returns (a dict,
    or an instance of ``result``) becomes the job's ``result``. ``result`` defaults to the
    handler's return annotation when that is a pydantic model.

    ``media_types`` are what the job's single artifact can be (e.g. ``("text/plain",)``): a
    sync request that does not prefer JSON gets the artifact's bytes. With several, ``pick``
    says which one a given request produces (e.g. from its ``format`` field).

    The OpenAPI path item is generated: ``requestBody`` referencing ``request``; 200 with the
    Job JSON (``job_name``, default ``<Result>Job``: a Job whose ``result`` is ``result``) and
    each raw media type; 202 when the model has ``mode``; the host's standard errors
    (``STANDARD_ERRORS``). Adjust it with ``responses`` (a string replaces a response's
    description, a dict the whole response object), ``openapi`` (deep-merged over the
    generated operation object) and ``schema_overrides`` (deep-merged over the generated
    component schemas, by name).
    """

    capability: Capability
    path: str
    request: type[Req]
    handler: Callable[[JobContext], dict[str, Any] | BaseModel]
    _: KW_ONLY
    result: type[BaseModel] | None = None
    job_type: str = ""
    method: str = "POST"
    media_types: Sequence[str] = ()
    pick: Callable[[Req], str] | None = None
    prepare: Callable[[Req, Request], dict[str, Any] | Awaitable[dict[str, Any]]] | None = None
    summary: str = ""
    description: str = ""
    tags: Sequence[str] = ()
    job_name: str = ""
    responses: Mapping[str, str | dict[str, Any]] = field(default_factory=dict)
    openapi: Mapping[str, Any] = field(default_factory=dict)
    schema_overrides: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    # What the host registers for job_type: the handler, its result dumped to JSON.
    job_handler: JobHandler = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("media_types", "tags"):  # one string is one item, not its characters
            if isinstance(getattr(self, name), str):
                put(name, (getattr(self, name),))
        if self.result is None:
            put("result", _returned_model(self.handler))
        if not self.job_type and isinstance(self.capability, Capability):
            put("job_type", self.capability.name)
        problems = list(self._problems())
        if problems:
            raise ValueError(f"Operation {self.path!r}: " + "; ".join(problems))
        put("method", self.method.upper())
        put("media_types", tuple(self.media_types))
        put("tags", tuple(self.tags) or (self.capability.name,))
        if not self.job_name:
            name = self.result_model.__name__
            put("job_name", f"{name.removesuffix('Result').removesuffix('Response') or name}Job")
        handler = self.handler

        def job_handler(ctx: JobContext) -> dict[str, Any]:
            out = handler(ctx)
            return out.model_dump(mode="json") if isinstance(out, BaseModel) else out

        put("job_handler", job_handler)

    @property
    def result_model(self) -> type[BaseModel]:
        assert self.result is not None  # set by __post_init__ or refused there
        return self.result

    def _problems(self) -> Iterable[str]:
        if not isinstance(self.capability, Capability):
            yield f"capability must be a Capability, not {type(self.capability).__name__}"
        if not isinstance(self.path, str) or not _PATH.match(self.path):
            yield f"path must be relative to the capability and match {_PATH.pattern}"
        if self.method.upper() not in BODY_METHODS:
            yield f"method must be one of {', '.join(sorted(BODY_METHODS))} (it reads a body)"
        if not (isinstance(self.request, type) and issubclass(self.request, BaseModel)):
            yield f"request must be a pydantic model class, not {self.request!r}"
        if not (isinstance(self.result, type) and issubclass(self.result, BaseModel)):
            yield (
                f"result must be a pydantic model class, not {self.result!r} (give result=, or"
                " annotate the handler's return type with the model)"
            )
        if not isinstance(self.job_type, str) or not _SLUG.match(self.job_type):
            yield f"job_type must match {_SLUG.pattern}"
        if not callable(self.handler):
            yield "handler is not callable"
        for media_type in self.media_types:
            if not _MEDIA_TYPE.match(media_type) or media_type == "application/json":
                yield f"media type {media_type!r} is not a type/subtype other than JSON"
        if len(self.media_types) > 1 and self.pick is None:
            yield "several media_types need pick(body) to say which one a request produces"
        for code in self.responses:
            if not _STATUS.match(code):
                yield f"responses key {code!r} is not a status code"

    @property
    def full_path(self) -> str:
        return f"{self.capability.prefix}/{self.path}"

    @property
    def _has_mode(self) -> bool:
        return "mode" in self.request.model_fields

    def _media_type_for(self, body: Req) -> str | None:
        if self.pick is not None:
            return self.pick(body)
        return self.media_types[0] if self.media_types else None

    async def _params_for(self, body: Req, request: Request) -> dict[str, Any]:
        if self.prepare is None:
            return body.model_dump(
                mode="json", exclude={"mode", "webhook", "webhook_events_filter", "keep_alive"}
            )
        if inspect.iscoroutinefunction(self.prepare):
            params = await self.prepare(body, request)
        else:
            # A plain function may block (a file, a lock): never on the event loop.
            params = await run_in_threadpool(self.prepare, body, request)
            if inspect.isawaitable(params):
                params = await params
        if not isinstance(params, dict):
            raise TypeError(f"prepare() for {self.full_path} returned {type(params).__name__}")
        return params

    def route(self) -> Route:
        """The Starlette route running this operation."""
        from kiapi_core.host import host
        from kiapi_core.jobs.respond import respond_with_job
        from kiapi_core.jobs.submit import check_keep_alive, submit_options, webhook_for
        from kiapi_core.web.body import read_json

        async def endpoint(request: Request) -> Response:
            body = await read_json(request, self.request)
            webhook = getattr(body, "webhook", None)
            webhook_events = getattr(body, "webhook_events_filter", None)
            # The request is checked whole before prepare's availability checks (a 503 for
            # missing weights), so a refused webhook always reads as the 422 it is.
            await webhook_for(request, submit_options(request), webhook, webhook_events)
            keep_alive = getattr(body, "keep_alive", None)
            if keep_alive is not None:  # refused before prepare() does any work
                limit = host(request).settings.max_keep_alive_s
                check_keep_alive(keep_alive, limit, ["body", "keep_alive"])
            params = await self._params_for(body, request)
            return await respond_with_job(
                request,
                job_type=self.job_type,
                params=params,
                mode=getattr(body, "mode", "sync") if self._has_mode else "sync",
                media_type=self._media_type_for(body),
                # A request model may carry them as fields (the ideogram4 and zimage ones do).
                webhook=webhook,
                webhook_events=webhook_events,
                # A request model's optional `keep_alive` field (seconds) is the job's.
                keep_alive=keep_alive,
            )

        endpoint.__name__ = self.operation_id
        return Route(self.full_path, endpoint, methods=[self.method])

    @property
    def operation_id(self) -> str:
        # FastAPI's scheme (the ideogram4 contract's operationIds follow it).
        last = self.path.rsplit("/", 1)[-1]
        return re.sub(r"\W", "_", f"{last}{self.full_path}") + f"_{self.method.lower()}"

    def fragment(self) -> dict[str, Any]:
        """The OpenAPI fragment: this operation's path item and the components it needs."""
        from kiapi_core.jobs.schemas import AcceptedJob, typed_job
        from kiapi_core.jobs.submit import (
            PREFERENCE_APPLIED_HEADER,
            REPLAYED_HEADER,
            SUBMIT_HEADER_REFS,
            SUBMIT_PARAMS,
        )
        from kiapi_core.web.openapi import error_response, json_response
        from kiapi_core.web.schema import components_from, ref

        job = typed_job(self.job_name, self.result_model)
        content: dict[str, Any] = {"application/json": {"schema": ref(job)}}
        for media_type in self.media_types:
            text = media_type.startswith("text/")
            content[media_type] = {
                "schema": {"type": "string"} if text else {"type": "string", "format": "binary"}
            }
        ok: dict[str, Any] = {"description": "Sync result: the Job JSON.", "content": content}
        if self.media_types:
            ok["description"] = (
                "Sync result: the artifact's bytes, or the Job JSON with Accept: application/json."
            )
            ok["headers"] = copy.deepcopy(_RAW_HEADERS)
        ok["headers"] = {**ok.get("headers", {}), **REPLAYED_HEADER}
        responses: dict[str, Any] = {"200": ok}
        early = (
            "a sync request answered early as its Prefer header asked: then the Job JSON"
            " (AcceptedJob, which carries `job_id` too)."
        )
        if self._has_mode:
            responses["202"] = json_response(
                ref("AsyncJobResponse"),
                "Async: accepted; poll GET /v1/jobs/{job_id}. Also " + early,
            )
        else:
            responses["202"] = json_response(ref("AcceptedJob"), "Accepted: " + early)
        responses["202"]["headers"] = {**REPLAYED_HEADER, **PREFERENCE_APPLIED_HEADER}
        responses.update({code: error_response(text) for code, text in STANDARD_ERRORS.items()})
        for code, override in self.responses.items():
            if isinstance(override, str):
                responses[code] = {
                    **responses.get(code, error_response("")),
                    "description": override,
                }
            else:
                responses[code] = copy.deepcopy(override)
        operation: dict[str, Any] = {"summary": self.summary or self.path.replace("/", " ").title()}
        if self.description:
            operation["description"] = self.description
        operation["operationId"] = self.operation_id
        operation["tags"] = list(self.tags)
        if self.media_types:
            operation["parameters"] = [_accept_parameter(self.media_types)]
        # Named, not listed in ``parameters``: a contract may fix an operation's parameter list.
        operation["x-kiapi-submit-headers"] = SUBMIT_HEADER_REFS
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref(self.request)}},
        }
        operation["responses"] = dict(sorted(responses.items()))
        operation = deep_merge(operation, self.openapi)
        schemas = components_from(self.request, job, AcceptedJob)
        for name, override in self.schema_overrides.items():
            if name not in schemas:
                raise ValueError(
                    f"Operation {self.full_path}: schema_overrides names {name!r}, which it does"
                    f" not generate (it generates {', '.join(sorted(schemas))})"
                )
            schemas[name] = deep_merge(schemas[name], override)
        return {
            "paths": {self.full_path: {self.method.lower(): operation}},
            "components": {"schemas": schemas, "parameters": copy.deepcopy(SUBMIT_PARAMS)},
        }

    def _cache_inputs(self) -> dict[str, Any]:
        """Everything besides source files that the fragment shows (for the fragment cache)."""
        return {
            "capability": [self.capability.name, self.capability.domain],
            "path": self.path,
            "method": self.method,
            "media_types": list(self.media_types),
            "summary": self.summary,
            "description": self.description,
            "tags": list(self.tags),
            "job_name": self.job_name,
            "request": f"{self.request.__module__}.{self.request.__qualname__}",
            "result": f"{self.result_model.__module__}.{self.result_model.__qualname__}",
            "responses": self.responses,
            "openapi": self.openapi,
            "schema_overrides": self.schema_overrides,
        }

    def _source_modules(self) -> set[str]:
        """Top-level modules defining the models this fragment is generated from."""
        models = _model_modules(self.request) | _model_modules(self.result_model)
        return {m.split(".")[0] for m in models}


def _returned_model(handler: Any) -> type[BaseModel] | None:
    """The pydantic model a handler's return annotation names, if it names one."""
    try:
        returned = typing.get_type_hints(handler).get("return")
    except Exception:  # an annotation that does not resolve: the caller says to give result=
        return None
    return returned if isinstance(returned, type) and issubclass(returned, BaseModel) else None


def _accept_parameter(media_types: Sequence[str]) -> dict[str, Any]:
    doc = (
        "Preferred response type: application/json returns the Job JSON; otherwise a sync "
        f"request answers with the artifact's bytes ({', '.join(media_types)})."
    )
    first = media_types[0]
    return {
        "name": "Accept",
        "in": "header",
        "required": False,
        "schema": {
            "anyOf": [{"type": "string"}, {"type": "null"}],
            "title": "Accept",
            "description": doc,
            "examples": ["application/json", first, first.split("/")[0] + "/*"],
        },
        "description": doc,
    }


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in: dicts recursively, anything else replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _model_modules(model: Any, seen: set[Any] | None = None) -> set[str]:
    """Modules of ``model``, its bases and every pydantic model its fields mention."""
    seen = set() if seen is None else seen
    if id(model) in seen:
        return set()
    seen.add(id(model))
    if isinstance(model, type) and issubclass(model, BaseModel):
        # BaseModel itself is pydantic's: its version is in the cache key already.
        out = {c.__module__ for c in model.__mro__ if issubclass(c, BaseModel)} - {"pydantic.main"}
        for info in model.model_fields.values():
            out |= _model_modules(info.annotation, seen)
        return out
    out = set()
    if isinstance(model, types.UnionType) or typing.get_origin(model) is not None:
        for arg in typing.get_args(model):
            out |= _model_modules(arg, seen)
    return out


def contribute(
    plugin: str, operations: Sequence[Operation[Any]]
) -> tuple[list[Route], dict[str, Any]]:
    """The routes and the merged OpenAPI fragment of one plugin's operations.

    The fragment is reused from an earlier start while nothing it shows changed: the
    declarations themselves, the sources of the modules defining their models and of the host
    (generating JSON Schema from pydantic models is a noticeable share of start-up).
    """
    from kiapi_core.web.openapi import cached_fragment

    seen: set[tuple[str, str]] = set()
    for op in operations:
        key = (op.full_path, op.method)
        if key in seen:
            raise ValueError(f"operation {op.method} {op.full_path} declared twice")
        seen.add(key)

    def build() -> dict[str, Any]:
        merged: dict[str, Any] = {"paths": {}, "components": {"schemas": {}}}
        for op in operations:
            fragment = op.fragment()
            for path, item in fragment["paths"].items():
                merged["paths"].setdefault(path, {}).update(item)
            parts = fragment["components"]
            for section, name, schema in ((s, n, v) for s in parts for n, v in parts[s].items()):
                known = merged["components"].setdefault(section, {}).setdefault(name, schema)
                if known != schema:
                    raise ValueError(
                        f"operation {op.method} {op.full_path}: component {name!r} differs from"
                        " the one another operation of this plugin generates"
                    )
        return merged

    modules = set().union(*(op._source_modules() for op in operations)) | {"kiapi_core"}
    if not all(_cacheable(m) for m in modules):
        fragment = build()
    else:
        fragment = cached_fragment(
            "operations-" + re.sub(r"[^A-Za-z0-9_.-]", "_", plugin),
            build,
            packages=sorted(modules),
            inputs=[op._cache_inputs() for op in operations],
        )
    return [op.route() for op in operations], fragment


def _cacheable(module: str) -> bool:
    """Whether a module's sources can be found on disk (not ``__main__``, not built in code)."""
    from importlib.util import find_spec

    try:
        spec = find_spec(module)
    except (ImportError, ValueError):
        return False
    return spec is not None and (
        bool(spec.submodule_search_locations) or bool(spec.origin and spec.has_location)
    )


__all__ = ["STANDARD_ERRORS", "Operation", "contribute", "deep_merge"]
