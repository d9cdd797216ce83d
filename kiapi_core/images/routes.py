"""``POST /v1/images/generations``: parse, pick the generator, run one job per image, answer.

Every error leaves in OpenAI's envelope ``{"error": {message, type, param, code}}`` so the
official clients raise their usual exceptions (BadRequestError, NotFoundError, ...).
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiapi_core.host import Host, host
from kiapi_core.images.generator import ImageGenerator, ImageParamError, ImageRequest
from kiapi_core.images.schemas import QUALITY_ALIASES, ImageGenerationRequest
from kiapi_core.jobs.service import NoHandler
from kiapi_core.jobs.status import ErrorKind, failure_http_status
from kiapi_core.jobs.store import IdempotencyConflict, JobRecord, QueueFull
from kiapi_core.jobs.submit import (
    IDEMPOTENCY_KEY,
    REPLAYED,
    SubmitOptions,
    idempotency_for,
    submit_options,
    webhook_for,
)
from kiapi_core.models.spec import ModelSpec, resolve_model
from kiapi_core.models.weights import missing_weights
from kiapi_core.plugins import Registry
from kiapi_core.web.body import read_json
from kiapi_core.web.errors import ApiError
from kiapi_core.webhooks.spec import WebhookSpec

log = logging.getLogger("kiapi.images")

PATH = "/v1/images/generations"
_TYPES = {401: "authentication_error", 429: "rate_limit_error"}
# OpenAI's error ``code`` for a failed job's kind; its HTTP status is the capability routes'.
_CODES = {
    ErrorKind.invalid_input: "invalid_input",
    ErrorKind.unavailable: "model_unavailable",
    ErrorKind.timeout: "timeout",
    ErrorKind.interrupted: "interrupted",
    ErrorKind.disk_full: "disk_full",
    ErrorKind.canceled: "job_canceled",
    ErrorKind.http_error: "job_failed",
}


class ImagesError(Exception):
    """An answer in OpenAI's error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers
        self.extra = extra

    def response(self) -> JSONResponse:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else None)
        body = {
            "error": {
                "message": self.message,
                "type": kind or "invalid_request_error",
                "param": self.param,
                "code": self.code,
                **self.extra,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _from_body_error(exc: ApiError) -> ImagesError:
    """read_json's 415/422 as a 400 naming the first offending field, as OpenAI does."""
    if not isinstance(exc.detail, list) or not exc.detail:
        return ImagesError(exc.status if exc.status != 422 else 400, str(exc.detail))
    first = exc.detail[0]
    loc = [str(part) for part in first.get("loc", [])[1:]]
    param = loc[0] if loc else None
    messages = "; ".join(
        f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.detail
    )
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    return ImagesError(400, messages, param=param, code=code)


async def _read(request: Request) -> ImageGenerationRequest:
    try:
        return await read_json(request, ImageGenerationRequest)
    except ApiError as exc:
        raise _from_body_error(exc) from None


def _choices(registry: Registry) -> str:
    names = []
    for generator in registry.image_generators.values():
        for spec in registry.models_for(generator.family):
            aliases = f" (also {', '.join(spec.names())})"
            names.append(spec.key + aliases)
    return "; ".join(names) or "none: no installed plugin generates images"


def pick(registry: Registry, requested: str | None) -> tuple[ImageGenerator, ModelSpec]:
    """The generator and model a request names: ``family/name``, a name, an alias or a family.

    With no model named, the first image capability's default model (plugins in load order).
    """
    for generator in registry.image_generators.values():
        specs = registry.models_for(generator.family)
        if requested is None or requested.strip().lower() == generator.family.lower():
            spec = resolve_model(specs, None)
        else:
            wanted = requested.strip().lower()
            spec = next((s for s in specs if s.key.lower() == wanted), None)
            spec = spec or resolve_model(specs, wanted)
        if spec is not None:
            return generator, spec
    shown = "(none)" if requested is None else repr(requested)
    raise ImagesError(
        404,
        f"the model {shown} does not exist here; available: {_choices(registry)}",
        param="model",
        code="model_not_found",
    )


def _prepare(
    generator: ImageGenerator, spec: ModelSpec, body: ImageGenerationRequest
) -> list[dict[str, Any]]:
    size = body.dimensions()
    quality = body.quality or "auto"
    request = ImageRequest(
        prompt=body.prompt,
        model=spec,
        n=body.n or 1,
        width=size[0] if size else None,
        height=size[1] if size else None,
        quality=QUALITY_ALIASES.get(quality, quality),  # type: ignore[arg-type]
        output_format=body.output_format or "png",
        output_compression=body.output_compression,
        seed=body.seed,
        extra=dict(body.model_extra or {}),
    )
    try:
        params = generator.prepare(request)
    except ImageParamError as exc:
        raise ImagesError(400, exc.message, param=exc.param, code="invalid_value") from None
    if len(params) != request.n:
        raise RuntimeError(
            f"image generator for {generator.family!r} prepared {len(params)} jobs for n={request.n}"
        )
    return params


def _options(request: Request) -> SubmitOptions:
    try:
        return submit_options(request)
    except ApiError as exc:
        problem = exc.detail[0]
        # OpenAI's shape for a refused parameter: 400 invalid_request_error (as every other
        # refused value on this route), never the host's 422.
        raise ImagesError(
            400, f"{problem['loc'][-1]}: {problem['msg']}", param=str(problem["loc"][-1])
        ) from None


async def _webhook(request: Request) -> WebhookSpec | None:
    try:
        return await webhook_for(request, _options(request))
    except ApiError as exc:
        problem = exc.detail[0]
        raise ImagesError(
            400, f"{problem['loc'][-1]}: {problem['msg']}", param=str(problem["loc"][-1])
        ) from None


async def _submit(
    h: Host,
    request: Request,
    job_type: str,
    all_params: list[dict[str, Any]],
    media_type: str,
    hook: WebhookSpec | None,
) -> list[JobRecord]:
    """All the images' jobs or none: a partly accepted request would be neither done nor retryable.

    Each must save exactly one image (``media_type``), or it fails. With an Idempotency-Key,
    image ``i`` is the job of key ``KEY#i``: a repeat finds them all."""
    opts = _options(request)
    jobs: list[JobRecord] = []
    keys: list[str] = []
    try:
        for i, params in enumerate(all_params):
            key = await idempotency_for(
                request, job_type, opts.idempotency_key, h.settings.idempotency_ttl_s, f"#{i}"
            )
            job = await h.jobs.submit(
                job_type,
                params,
                artifact_type=media_type,
                priority=opts.priority,
                cancel_after_s=opts.cancel_after_s,
                idempotency=key,
                webhook=hook,
                keep_alive_s=opts.keep_alive_s,
            )
            jobs.append(job)
            if key is not None and not job.replayed:
                keys.append(key.key)
    except IdempotencyConflict as exc:
        raise ImagesError(
            400,
            f"{IDEMPOTENCY_KEY} was first sent with a different request (it created"
            f" {exc.job_id}); send a new key for a new request",
            param=IDEMPOTENCY_KEY,
            code="idempotency_key_reused",
        ) from None
    except NoHandler as exc:
        raise ImagesError(503, str(exc), code="model_unavailable") from None
    except QueueFull as exc:
        for job in jobs:
            await h.jobs.cancel(job.id)
        if keys:  # refused: a retry with the key must try again, not find canceled jobs
            await h.jobs.forget_idempotency(keys)
        retry = await h.jobs.retry_after_s(job_type)
        raise ImagesError(
            429,
            f"{exc}; retry in about {retry}s",
            code="queue_full",
            headers={"Retry-After": str(retry)},
        ) from None
    return jobs


async def _cancel_unfinished(h: Host, jobs: list[JobRecord]) -> None:
    for job in jobs:
        current = await h.jobs.get(job.id)
        if current is not None and not current.terminal:
            await h.jobs.cancel(job.id)


async def _wait(h: Host, jobs: list[JobRecord]) -> list[JobRecord]:
    """Every job once succeeded. On a failure or timeout the others are canceled: an OpenAI
    client cannot come back for them, and would resubmit on a retry."""
    ids = [job.id for job in jobs]
    deadline = time.monotonic() + h.settings.sync_timeout_s
    finished: list[JobRecord] = []
    for job in jobs:
        done = await h.jobs.wait_terminal(job.id, max(0.0, deadline - time.monotonic()))
        if done is None:
            raise RuntimeError(f"job {job.id} vanished from the store")
        if not done.terminal:
            await _cancel_unfinished(h, jobs)
            raise ImagesError(
                504,
                f"the images were not ready within KIAPI_SYNC_TIMEOUT_S="
                f"{h.settings.sync_timeout_s:g}s; their jobs were canceled",
                code="timeout",
                kiapi_job_ids=ids,
            )
        if done.status != "succeeded":
            await _cancel_unfinished(h, jobs)
            status = failure_http_status(done.status, done.error_kind, done.error_status)
            kind = ErrorKind.canceled if done.status == "canceled" else done.error_kind
            code = _CODES.get(kind, "generation_failed")  # type: ignore[call-overload]
            raise ImagesError(
                status, f"job {done.id} {done.status}: {done.error}", code=code, kiapi_job_ids=ids
            )
        finished.append(done)
    return finished


async def _image(h: Host, request: Request, job: JobRecord, as_url: bool) -> dict[str, Any]:
    if len(job.artifacts) != 1:  # a job stored before the count was checked
        raise RuntimeError(f"job {job.id} saved {len(job.artifacts)} files, not one image")
    info = await h.call(h.files.get, job.artifacts[0])
    if info is None:
        raise RuntimeError(f"job {job.id} succeeded but its image file is missing")
    item: dict[str, Any] = {"kiapi_job_id": job.id, "kiapi_file_id": info.id}
    if as_url:
        item["url"] = f"{str(request.base_url).rstrip('/')}/v1/files/{info.id}/download"
    else:
        data = await run_in_threadpool(h.files.blob_path(info).read_bytes)
        item["b64_json"] = base64.b64encode(data).decode("ascii")
    return item


async def _generate(request: Request) -> Response:
    h = host(request)
    body = await _read(request)
    generator, spec = pick(h.registry, body.model)
    # The request is checked whole before availability, so a bad value never reads as a 503.
    all_params = _prepare(generator, spec, body)
    hook = await _webhook(request)
    missing = missing_weights(h.weights, spec)
    if missing:
        raise ImagesError(503, missing, param="model", code="model_not_activated")
    media_type = f"image/{body.output_format or 'png'}"
    jobs = await _submit(h, request, generator.job_type, all_params, media_type, hook)
    finished = await _wait(h, jobs)
    as_url = body.response_format == "url"
    data = []
    for job in finished:
        item = await _image(h, request, job, as_url)
        data.append({**item, "revised_prompt": body.prompt})
    return JSONResponse(
        {
            "created": int(time.time()),
            "data": data,
            "output_format": body.output_format or "png",
            "model": spec.key,
            "kiapi_job_ids": [job.id for job in finished],
        },
        headers=REPLAYED if jobs and jobs[0].replayed else None,
    )


async def create_images(request: Request) -> Response:
    try:
        return await _generate(request)
    except ImagesError as exc:
        return exc.response()
    except Exception:
        # The host's own 500 would be {"detail": ...}; keep even this one in OpenAI's shape.
        log.exception("POST %s failed", PATH)
        return ImagesError(500, "internal server error; the server log has the details").response()


routes = [Route(PATH, create_images, methods=["POST"])]
