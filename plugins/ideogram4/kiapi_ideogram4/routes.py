"""HTTP routes of the ideogram4 capability: what generate checks before queueing, and the
hand-written GET /models and POST /validate (generate itself is declared in plugin.py)."""

from __future__ import annotations

import secrets
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiapi_core import (
    ApiError,
    ModelSpec,
    activation_command,
    host_of,
    missing_weights,
    read_json,
    require_model,
)
from kiapi_ideogram4.captions import prepare_caption
from kiapi_ideogram4.catalog import FAMILY
from kiapi_ideogram4.schemas import CaptionCheck, GenerateRequest
from kiapi_ideogram4.settings import get_settings

PREFIX = "/v1/image/ideogram4"
JOB_TYPE = "ideogram4"


def _model(request: Request, requested: str | None) -> ModelSpec:
    return require_model(host_of(request).registry.models_for(FAMILY), requested, "ideogram4")


def resolve_params(body: GenerateRequest, spec: ModelSpec) -> dict[str, Any]:
    """Every value the run will use, including the drawn seed, so the result is reproducible."""
    settings = get_settings()
    return {
        "model": spec.name,
        "prompt": body.prompt,
        "preset": body.preset if "preset" in body.model_fields_set else settings.default_preset,
        "width": body.width if body.width is not None else settings.default_width,
        "height": body.height if body.height is not None else settings.default_height,
        "seed": body.seed if body.seed is not None else secrets.randbelow(2**32),
        "quantize": body.quantize if body.quantize is not None else settings.quantize,
        "format": body.format,
        "quality": body.quality,
        "preview": body.preview,
        "strict_caption_validation": body.strict_caption_validation,
        "warn_on_caption_issues": body.warn_on_caption_issues,
    }


async def prepare_generate(body: GenerateRequest, request: Request) -> dict[str, Any]:
    """The job's params, after the checks only the server can make: 400 for an unknown model
    or (strict) caption issues, 503 naming the command when the weights are not activated."""
    spec = _model(request, body.model)
    if body.strict_caption_validation:
        report = await run_in_threadpool(prepare_caption, body.prompt)
        if report["warnings"]:
            raise ApiError(
                400,
                {
                    "loc": ["body", "prompt"],
                    "msg": "mflux's caption verifier reported issues and strict_caption_validation is true",
                    "issues": report["warnings"],
                },
            )
    missing = missing_weights(host_of(request).weights, spec)
    if missing:
        raise ApiError(503, missing, command=activation_command(spec))
    return resolve_params(body, spec)


async def list_models(request: Request) -> Response:
    return JSONResponse([s.public() for s in host_of(request).registry.models_for(FAMILY)])


async def validate_caption(request: Request) -> Response:
    body = await read_json(request, CaptionCheck)
    report = await run_in_threadpool(prepare_caption, body.prompt)
    return JSONResponse({"valid": not report["warnings"], **report})


routes = [
    Route(f"{PREFIX}/models", list_models, methods=["GET"]),
    Route(f"{PREFIX}/validate", validate_caption, methods=["POST"]),
]
