"""Building the Starlette app: plugins, stores, worker, middleware, merged OpenAPI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from kiapi_core import playground
from kiapi_core.capabilities import Capability
from kiapi_core.host import Host
from kiapi_core.jobs.hot_read import JobReads
from kiapi_core.jobs.service import JobService
from kiapi_core.node import build_backend
from kiapi_core.plugin_refs import PluginRef, reference
from kiapi_core.plugins import Registry, build_registry, run_lifecycle
from kiapi_core.runtime import collector
from kiapi_core.runtime.execute import unhandled_error
from kiapi_core.settings import Settings
from kiapi_core.state.homelock import lock_home, unlock_home
from kiapi_core.web.cors import ListedOriginsCORS
from kiapi_core.web.errors import exception_handlers
from kiapi_core.web.middleware import BearerAuth, BodyLimit
from kiapi_core.web.openapi import HTTP_METHODS, capability_document, error_response
from kiapi_core.webhooks.delivery import Deliverer, deliverer_for
from kiapi_core.webhooks.outbox import Outbox
from kiapi_core.webhooks.targets import AllowList, TargetRefused, check_host, parse_target

log = logging.getLogger("kiapi")


def _capability_route(capability: Capability) -> Route:
    async def capability_openapi(request: Request) -> Response:
        return JSONResponse(capability_document(request.app.state.kiapi.openapi(), capability))

    return Route(f"{capability.prefix}/openapi.json", capability_openapi, methods=["GET"])


def _finish_openapi(registry: Registry, settings: Settings) -> dict[str, Any]:
    doc = registry.openapi.doc
    for cap in registry.capabilities.values():
        doc["paths"][f"{cap.prefix}/openapi.json"] = {
            "get": {
                "summary": f"OpenAPI document of the {cap.name} capability",
                "tags": [cap.name],
                "responses": {
                    "200": {
                        "description": "This capability's paths and schemas only.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        }
    if settings.api_key is not None:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
        for path, item in doc["paths"].items():
            for method in HTTP_METHODS:
                if method in item:
                    if path in playground.PATHS:
                        item[method]["description"] = playground.AUTH_NOTE
                    if path == "/health":
                        item[method]["security"] = []
                    else:
                        item[method]["responses"].setdefault(
                            "401", error_response("Missing or wrong bearer token.")
                        )
    return doc


def _routes(registry: Registry) -> list[BaseRoute]:
    return [*registry.routes, *(_capability_route(c) for c in registry.capabilities.values())]


def _in_code_job_plugins(
    registry: Registry, extra: Iterable[tuple[str, object]]
) -> list[PluginRef] | None:
    """The plugins registered in code that run jobs, named so the worker process loads them
    too; None when one cannot be named (its jobs then run on threads of this process)."""
    refs = []
    for name, obj in extra:
        info = registry.plugins.get(name)
        if info is None or info.status != "loaded" or not info.job_types:
            continue
        ref, why = reference(name, obj)
        if ref is None:
            log.warning(
                "plugin %s registered in code runs jobs but %s: jobs run on threads of the"
                " server (KIAPI_WORKER_MODE=thread)",
                name,
                why,
            )
            return None
        refs.append(ref)
    return refs


def create_app(
    settings: Settings | None = None,
    *,
    extra_plugins: Iterable[tuple[str, object]] = (),
) -> Starlette:
    """The whole host. ``extra_plugins`` registers plugin objects directly (for tests)."""
    settings = settings or Settings()
    settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    extra_plugins = list(extra_plugins)
    registry = build_registry(settings, extra=extra_plugins)
    doc = _finish_openapi(registry, settings)

    # KIAPI_BACKEND: embedded (SQLite + in-process worker) or celery (Redis + `kiapi worker`s).
    backend = build_backend(settings)
    deliverer = _deliverer(settings, backend.outbox)
    db, files, weights, events, store = (
        backend.db,
        backend.files,
        backend.weights,
        backend.events,
        backend.store,
    )
    pool, models = backend.dispatcher(
        handlers=registry.handlers,
        plugin_of=registry.plugin_of_job_type(),
        in_code=_in_code_job_plugins(registry, extra_plugins),
        catalog=registry.models,
    )
    jobs = JobService(
        store,
        pool,
        events,
        files,
        max_queue=settings.max_queue,
        workers=settings.workers,
        call=backend.call,
        handled=frozenset(registry.handlers),
        unhandled_error=unhandled_error,
        owns_queue=settings.backend == "embedded",
        previews=backend.previews,
        keepalive_s=settings.sse_keepalive_s,
    )
    state = Host(
        settings=settings,
        registry=registry,
        db=db,
        files=files,
        jobs=jobs,
        models=models,
        weights=weights,
        started_at=time.time(),
        call=backend.call,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.bind(asyncio.get_running_loop())
        # Before recovery: what looks left over must not be another live server's work.
        lock = lock_home(settings.home) if settings.backend == "embedded" else None
        try:
            interrupted = jobs.recover()
            if interrupted:
                log.warning(
                    "%d job(s) were running when the server stopped; marked failed",
                    len(interrupted),
                )
            files.remove_orphans()
            if db is not None:
                # From here on, a request finding kiapi.db locked waits off the loop (db.call).
                db.serve_from_this_thread()
            # Before any job runs: a plugin opens its resources first. One whose resources did
            # not open serves nothing: it is withdrawn whole, as if refused at load.
            for name in await run_lifecycle(registry, "startup", state):
                taken = registry.withdraw(name)
                app.router.routes[:] = [r for r in app.router.routes if r not in taken]
                jobs.handled = frozenset(registry.handlers)
            pool.start()
            if deliverer is not None:
                if settings.backend == "embedded":
                    # One server per home: a lease left by a previous process is nobody's.
                    await backend.call(deliverer.outbox.release_leases)
                deliverer.start()
            sweeper = asyncio.create_task(_sweep(state))
            deadlines = asyncio.create_task(_expire_deadlines(state))
            collector.settle()
            try:
                yield
            finally:
                sweeper.cancel()
                deadlines.cancel()
                await asyncio.to_thread(pool.stop)
                if deliverer is not None:
                    await asyncio.to_thread(deliverer.stop)
                await run_lifecycle(registry, "shutdown", state)
                models.unload_all()
        finally:
            if lock is not None:
                unlock_home(lock)

    middleware = [
        Middleware(
            BodyLimit,
            max_body=settings.max_body_bytes,
            max_upload=settings.max_upload_bytes,
            upload_paths=frozenset({"/v1/files"}),
        )
    ]
    if any(
        isinstance(r, Route) and r.path == "/v1/jobs/{job_id}" and "GET" in (r.methods or ())
        for r in registry.routes
    ):
        # Innermost, so auth, CORS and the body limit hold for it as for any route.
        middleware.append(Middleware(JobReads, jobs=jobs, handlers=exception_handlers))
    if settings.api_key is not None:
        middleware.insert(
            0,
            Middleware(
                BearerAuth,
                api_key=settings.api_key.get_secret_value(),
                basic_paths=playground.PATHS,
            ),
        )
    if settings.cors_origins:
        # Outermost, so preflight requests are answered before auth asks for a token.
        middleware.insert(
            0,
            Middleware(
                ListedOriginsCORS,
                allow_origins=settings.cors_origins,
                allow_methods=["*"],
                allow_headers=["*"],
                expose_headers=["X-Kiapi-File-Id", "X-Kiapi-Job-Id", "Retry-After"],
            ),
        )

    app = Starlette(
        routes=_routes(registry),
        middleware=middleware,
        exception_handlers=exception_handlers,
        lifespan=lifespan,
    )
    app.state.kiapi = state
    app.state.openapi_bytes = json.dumps(doc).encode()
    return app


def _deliverer(settings: Settings, outbox: Outbox | None) -> Deliverer | None:
    """What sends this node's webhooks; the default URL refused at start, not at each submit."""
    if settings.webhook_url is not None:
        try:
            check_host(
                parse_target(settings.webhook_url), AllowList.parse(settings.webhook_allow), None
            )
        except TargetRefused as exc:
            raise ValueError(f"KIAPI_WEBHOOK_URL {exc}") from None
    if outbox is None or not settings.webhook_deliver:
        return None
    return deliverer_for(settings, outbox, f"api-{socket.gethostname()}-{os.getpid()}")


async def _expire_deadlines(state: Host) -> None:
    """Queued jobs past their deadline end canceled even when no worker is free to look."""
    while True:
        await asyncio.sleep(state.settings.deadline_sweep_s)
        try:
            await state.jobs.expire_deadlines()
        except Exception:
            log.exception("canceling jobs past their deadline failed")


async def _sweep(state: Host) -> None:
    """Retention of old files and finished jobs, and the disk reserve back once there is room,
    off the event loop, every KIAPI_SWEEP_INTERVAL_S."""
    while True:
        await asyncio.sleep(state.settings.sweep_interval_s)
        try:
            await asyncio.to_thread(state.files.sweep_expired, state.settings.files_ttl_s)
        except Exception:
            log.exception("file retention sweep failed")
        ttl_s = state.settings.jobs_ttl_s
        try:
            removed = await asyncio.to_thread(state.jobs.store.sweep_finished, ttl_s)
        except Exception:
            log.exception("job retention sweep failed")
        else:
            if removed:
                log.info("retention removed %d job(s) finished over %.0fs ago", removed, ttl_s)
        if state.db is not None:
            await asyncio.to_thread(state.db.ensure_reserve)
