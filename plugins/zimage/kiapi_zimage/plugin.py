"""kiapi-zimage: Z-Image Turbo text-to-image through mflux, as a kiapi plugin.

Imports nothing heavy: mlx and mflux load in the worker when the model first loads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.routing import BaseRoute

from kiapi_core import (
    IMAGE_MEDIA_TYPES,
    Capability,
    ImageGenerator,
    JobContext,
    ModelSpec,
    Operation,
    cached_fragment,
    hookimpl,
)
from kiapi_zimage.catalog import DOMAIN, FAMILY, MODELS
from kiapi_zimage.openai_images import prepare as prepare_images
from kiapi_zimage.openapi import (
    GENERATE_DOC,
    GENERATE_RESPONSES,
    fragment,
    generate_schema_overrides,
)
from kiapi_zimage.routes import JOB_TYPE, prepare_generate, routes
from kiapi_zimage.schemas import ZImageGenerateRequest, ZImageResponse

CAPABILITY = Capability(
    name=FAMILY,
    domain=DOMAIN,
    title="kiapi Z-Image API",
    description="Fast text-to-image: Z-Image Turbo (BF16) run locally by mflux (MLX).",
)


def _generate(ctx: JobContext) -> dict[str, Any]:
    from kiapi_zimage.handler import generate

    return generate(ctx)


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    for spec in MODELS:
        register(spec)


@hookimpl
def register_operations(register: Callable[[Operation[Any]], None]) -> None:
    # POST /v1/image/zimage/generate: route, OpenAPI path item and the job handler.
    register(
        Operation(
            CAPABILITY,
            "generate",
            ZImageGenerateRequest,
            _generate,
            result=ZImageResponse,
            job_type=JOB_TYPE,
            job_name="JobZImageResponse",
            media_types=tuple(IMAGE_MEDIA_TYPES.values()),
            pick=lambda body: IMAGE_MEDIA_TYPES[body.format],
            prepare=prepare_generate,
            summary="Generate",
            description=GENERATE_DOC,
            tags=("zimage",),
            responses=GENERATE_RESPONSES,
            schema_overrides=generate_schema_overrides(),
        )
    )


@hookimpl
def register_routes() -> list[BaseRoute]:
    return list(routes)


@hookimpl
def register_openapi() -> dict[str, Any]:
    return cached_fragment("zimage", fragment, packages=["kiapi_zimage", "kiapi_core"])


@hookimpl
def register_image_generators(register: Callable[[ImageGenerator], None]) -> None:
    # POST /v1/images/generations with model turbo / zimage / z-image / z-image-turbo.
    register(ImageGenerator(family=FAMILY, job_type=JOB_TYPE, prepare=prepare_images))
