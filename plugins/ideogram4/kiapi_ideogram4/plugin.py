"""kiapi-ideogram4: Ideogram 4 text-to-image through mflux, as a kiapi plugin.

Imports nothing heavy: mlx and mflux load in the worker when the model first loads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.routing import BaseRoute

from kiapi_core import (
    IMAGE_MEDIA_TYPES,
    Capability,
    HealthCheck,
    ImageGenerator,
    JobContext,
    ModelSpec,
    Operation,
    cached_fragment,
    hookimpl,
    python_check,
)
from kiapi_ideogram4.catalog import DOMAIN, FAMILY, MODELS
from kiapi_ideogram4.openai_images import prepare as prepare_images
from kiapi_ideogram4.openapi import (
    GENERATE_DOC,
    GENERATE_RESPONSES,
    fragment,
    generate_schema_overrides,
)
from kiapi_ideogram4.routes import JOB_TYPE, prepare_generate, routes
from kiapi_ideogram4.schemas import GenerateRequest, ImageResponse

DESCRIPTION = (
    "Typography-focused text-to-image: Ideogram 4 FP8 run locally by mflux (MLX). Prefer a JSON "
    "caption; bboxes are [y_min, x_min, y_max, x_max] in 0..1000."
)
CAPABILITY = Capability(
    name=FAMILY, domain=DOMAIN, title="kiapi Ideogram 4 API", description=DESCRIPTION
)


def _generate(ctx: JobContext) -> dict[str, Any]:
    # Imported on first use: the handler module pulls in nothing heavy itself, but keeping
    # the plugin module minimal makes its import cost obvious.
    from kiapi_ideogram4.handler import generate

    return generate(ctx)


# Run in a subprocess (never in the server): mlx.core can fail to import on a machine whose
# wheel does not fit it (a CUDA build without libcuda, two mlx backends sharing libmlx.so).
_MLX_PROBE = """
from kiapi_core import ensure_fast_blas
from kiapi_ideogram4.settings import get_settings
blas = ensure_fast_blas(get_settings().blas, "KIAPI_IDEOGRAM4_BLAS")
import mlx.core as mx
mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))
print(f"mlx {mx.__version__} on {mx.default_device()}; BLAS: {blas}")
"""
_MLX_CHECK_S = 120.0  # a first mlx import on a cold disk can take a while
MLX_CHECK = HealthCheck(
    "mlx",
    python_check(_MLX_PROBE, timeout_s=_MLX_CHECK_S),
    timeout_s=_MLX_CHECK_S,
    description="mlx.core imports and computes on its default device",
)


@hookimpl
def register_health_checks(register: Callable[[HealthCheck], None]) -> None:
    register(MLX_CHECK)


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    for spec in MODELS:
        register(spec)


@hookimpl
def register_operations(register: Callable[[Operation[Any]], None]) -> None:
    # POST /v1/image/ideogram4/generate: route, OpenAPI path item and the job handler.
    register(
        Operation(
            CAPABILITY,
            "generate",
            GenerateRequest,
            _generate,
            result=ImageResponse,
            job_type=JOB_TYPE,
            job_name="JobImageResponse",
            media_types=tuple(IMAGE_MEDIA_TYPES.values()),
            pick=lambda body: IMAGE_MEDIA_TYPES[body.format],
            prepare=prepare_generate,
            summary="Generate",
            description=GENERATE_DOC,
            responses=GENERATE_RESPONSES,
            schema_overrides=generate_schema_overrides(),
        )
    )


@hookimpl
def register_routes() -> list[BaseRoute]:
    return list(routes)


@hookimpl
def register_openapi() -> dict[str, Any]:
    return cached_fragment("ideogram4", fragment, packages=["kiapi_ideogram4", "kiapi_core"])


@hookimpl
def register_image_generators(register: Callable[[ImageGenerator], None]) -> None:
    # POST /v1/images/generations with model fp8 / ideogram4 / ideogram-4 runs these jobs.
    register(ImageGenerator(family=FAMILY, job_type=JOB_TYPE, prepare=prepare_images))
