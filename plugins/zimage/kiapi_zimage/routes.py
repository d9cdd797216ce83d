"""HTTP routes of the zimage capability: what generate checks before queueing, and the
hand-written GET /models (generate itself is declared in plugin.py)."""

from __future__ import annotations

import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiapi_core import (
    ApiError,
    ModelSpec,
    activation_command,
    host_of,
    missing_weights,
    require_model,
)
from kiapi_zimage.catalog import FAMILY
from kiapi_zimage.schemas import ZImageGenerateRequest
from kiapi_zimage.settings import get_settings

PREFIX = "/v1/image/zimage"
JOB_TYPE = "zimage"


def _model(request: Request, requested: str | None) -> ModelSpec:
    return require_model(host_of(request).registry.models_for(FAMILY), requested, "zimage")


def resolve_params(body: ZImageGenerateRequest, spec: ModelSpec) -> dict[str, Any]:
    """Every value the run will use, including the drawn seed, so the result is reproducible."""
    settings = get_settings()
    return {
        "model": spec.name,
        "prompt": body.prompt,
        "steps": body.steps if body.steps is not None else settings.default_steps,
        "width": body.width if body.width is not None else settings.default_width,
        "height": body.height if body.height is not None else settings.default_height,
        "seed": body.seed if body.seed is not None else secrets.randbelow(2**32),
        "quantize": body.quantize if body.quantize is not None else settings.quantize,
        "format": body.format,
        "quality": body.quality,
        "preview": body.preview,
    }


async def prepare_generate(body: ZImageGenerateRequest, request: Request) -> dict[str, Any]:
    """The job's params: 400 for an unknown model, 503 naming the command when the weights
    are not activated."""
    spec = _model(request, body.model)
    missing = missing_weights(host_of(request).weights, spec)
    if missing:
        raise ApiError(503, missing, command=activation_command(spec))
    return resolve_params(body, spec)


async def list_models(request: Request) -> Response:
    return JSONResponse([s.public() for s in host_of(request).registry.models_for(FAMILY)])


routes = [Route(f"{PREFIX}/models", list_models, methods=["GET"])]
