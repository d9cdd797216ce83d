"""Residency control: warm a model ahead (``POST /v1/models/{family}/{name}/load``, a
``kiapi.load`` job), unload it now (``DELETE /v1/models/{family}/{name}/resident``), and the
``/v1/models`` row that shows both (``resident``, ``expires_at``, ``in_use``).

The load job runs where jobs run (the worker process, a slot thread, or a ``kiapi worker``),
through the same ``ModelManager.use`` a generation takes, so the next job of that model finds it
warm. An unload goes to where the model is resident (``ModelsView.request_unload``: a direct
call, a pipe command to the worker process, a Redis control message to the ``kiapi worker``s)
and is answered once the residency view shows it gone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from pydantic import ConfigDict, Field, StrictFloat, StrictInt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiapi_core.host import Host, host
from kiapi_core.jobs.context import JobContext
from kiapi_core.jobs.errors import JobInputError
from kiapi_core.jobs.service import NoHandler
from kiapi_core.jobs.store import QueueFull
from kiapi_core.jobs.submit import check_keep_alive, submit_options
from kiapi_core.models.routing import LOAD_JOB, load_route_keys, model_id
from kiapi_core.models.spec import ModelSpec
from kiapi_core.models.weights import activation_command
from kiapi_core.web.body import read_json
from kiapi_core.web.errors import ApiError
from kiapi_core.web.schema import Schema

# How long an unload request waits for the residency view to show the model gone.
UNLOAD_WAIT_S = 10.0


class LoadRequest(Schema):
    """``POST /v1/models/{family}/{name}/load``: both optional."""

    model_config = ConfigDict(extra="forbid")

    quantize: StrictInt | None = Field(
        None,
        description=(
            "Load with this `quantize` option. Omit it for the model as jobs use it by default"
            " (ideogram4 / zimage: the configured KIAPI_*_QUANTIZE; another value runs as a"
            " one-off transient model in a job, so loading it ahead does not help those)."
        ),
    )
    keep_alive: StrictFloat | None = Field(
        None,
        description=(
            "Seconds it stays loaded once idle; 0 unloads it after loading (a check that it"
            " loads), -1 keeps it until memory is needed or an explicit unload. Wins over"
            " X-Kiapi-Keep-Alive; default KIAPI_MODEL_IDLE_TTL_S."
        ),
    )


def find_spec(h: Host, family: str, name: str) -> ModelSpec:
    wanted = name.strip().lower()
    for spec in h.registry.models:
        if spec.family == family.lower() and wanted in (n.lower() for n in spec.names()):
            return spec
    known = ", ".join(s.key for s in h.registry.models) or "none"
    raise ApiError(404, f"no model {family}/{name}; known: {known}")


def model_row(h: Host, spec: ModelSpec) -> dict[str, Any]:
    """One ``/v1/models`` entry: the catalog's facts with where and until when it is resident."""
    rows = [r for r in h.models.status() if not r["transient"] and model_id(r) == spec.key]
    expiries = [r["expires_at"] for r in rows if r.get("expires_at") is not None]
    kept = any(r.get("keep_alive_s") == -1 or r.get("expires_at") is None for r in rows)
    owner = h.registry.owner.get(("model", f"{spec.family}/{spec.name.lower()}"), "?")
    active = spec.weights is None or h.weights.path_for(spec) is not None
    return {
        "id": spec.key,
        "object": "model",
        "created": int(h.started_at),
        "owned_by": owner,
        **spec.public(),
        "memory_gb": spec.memory_gb,
        "active": active,
        "resident": bool(rows),
        # The latest idle unload among its copies; null when one is kept (or in use).
        "expires_at": None if not rows or kept else max(expiries),
        "in_use": sum(int(r["in_use"]) for r in rows),
        "loads": sum(n for k, n in h.models.load_counts.items() if k.split("[")[0] == spec.key),
        "transient_loads": h.models.transient_counts[spec.key],
        "activate_command": None if active else activation_command(spec),
    }


async def load_model(request: Request) -> Response:
    h = host(request)
    spec = find_spec(h, request.path_params["family"], request.path_params["name"])
    body = await read_json(request, LoadRequest) if await request.body() else LoadRequest()
    opts = submit_options(request)
    keep_alive = opts.keep_alive_s
    if body.keep_alive is not None:
        keep_alive = check_keep_alive(
            body.keep_alive, h.settings.max_keep_alive_s, ["body", "keep_alive"]
        )
    owner = h.registry.owner.get(("model", f"{spec.family}/{spec.name.lower()}"))
    job_types = sorted(
        t for (kind, t), o in h.registry.owner.items() if kind == "job type" and o == owner
    )
    names = [n.lower() for n in spec.names()]
    if body.quantize is None:
        keys = load_route_keys(job_types, names)
    else:
        keys = [f"{t}:{n}:{body.quantize}" for t in job_types for n in names]
    params: dict[str, Any] = {
        "model": spec.key,
        "options": {} if body.quantize is None else {"quantize": body.quantize},
        "route_keys": keys,
    }
    try:
        job = await h.jobs.submit(
            LOAD_JOB,
            params,
            priority=opts.priority,
            cancel_after_s=opts.cancel_after_s,
            keep_alive_s=keep_alive,
        )
    except NoHandler as exc:
        raise ApiError(503, str(exc)) from None
    except QueueFull as exc:
        raise ApiError(429, str(exc), headers={"Retry-After": "5"}) from None
    return JSONResponse(
        {**job.to_json(), "job_id": job.id},
        status_code=202,
        headers={"Location": f"/v1/jobs/{job.id}"},
    )


async def unload_model(request: Request) -> Response:
    h = host(request)
    spec = find_spec(h, request.path_params["family"], request.path_params["name"])
    row = model_row(h, spec)
    if row["in_use"]:
        raise ApiError(409, f"model {spec.key} is in use by {row['in_use']} job(s); retry after")
    if not row["resident"]:
        return JSONResponse(row)
    loads = row["loads"]
    await asyncio.to_thread(h.models.request_unload, spec.key)
    deadline = time.monotonic() + UNLOAD_WAIT_S
    while time.monotonic() < deadline:
        row = model_row(h, spec)
        if row["in_use"]:
            raise ApiError(409, f"model {spec.key} was taken by a job; retry after it")
        if not row["resident"]:
            return JSONResponse(row)
        if row["loads"] > loads:
            # Unloaded, then loaded again by a job (a warm-up queued before, say) in between
            # two looks: resident again, and the caller should know it.
            raise ApiError(
                409, f"model {spec.key} was unloaded, then loaded again by a job; retry after it"
            )
        await asyncio.sleep(0.05)
    raise ApiError(504, f"model {spec.key} was not unloaded within {UNLOAD_WAIT_S:g}s")


def run_load(ctx: JobContext) -> dict[str, Any]:
    """The ``kiapi.load`` job: load the model where jobs run, reporting how long it takes."""
    key = str(ctx.params.get("model"))
    spec = ctx.models.catalog.get(key)
    if spec is None:
        raise JobInputError(f"no model {key!r} is registered where this job ran")
    options = dict(ctx.params.get("options") or {})
    before = sum(n for k, n in ctx.models.load_counts.items() if k.split("[")[0] == key)
    ctx.progress(0.0, "loading")
    started = time.monotonic()
    done = threading.Event()

    def tick() -> None:
        # ModelSpec.load reports nothing: the elapsed time is the progress a follower sees.
        while not done.wait(0.5):
            if not ctx.report_progress(None, f"loading {time.monotonic() - started:.1f}s"):
                return

    ticker = threading.Thread(target=tick, name=f"kiapi-load-{ctx.job_id}", daemon=True)
    ticker.start()
    try:
        with ctx.models.use(spec, options):
            pass
    finally:
        done.set()
        ticker.join()
    loaded = sum(n for k, n in ctx.models.load_counts.items() if k.split("[")[0] == key) > before
    return {
        "model": key,
        "options": options,
        "loaded": loaded,  # false: it was resident already (its keep-alive renewed)
        "seconds": round(time.monotonic() - started, 3),
    }
