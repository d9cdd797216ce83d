"""kiapi-ideogram4: Ideogram 4 text-to-image through mflux, as a kiapi plugin.

Imports nothing heavy: mlx and mflux load on a worker thread when the model first loads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.routing import BaseRoute

from kiapi_core import Capability, ModelSpec, hookimpl
from kiapi_core.health import HealthCheck, python_check
from kiapi_core.images import ImageGenerator
from kiapi_core.jobs.context import JobHandler
from kiapi_core.web.openapi import cached_fragment
from kiapi_ideogram4.catalog import DOMAIN, FAMILY, MODELS
from kiapi_ideogram4.openai_images import prepare as prepare_images
from kiapi_ideogram4.openapi import fragment
from kiapi_ideogram4.routes import JOB_TYPE, routes
from kiapi_ideogram4.settings import get_settings

DESCRIPTION = (
    "Typography-focused text-to-image: Ideogram 4 FP8 run locally by mflux (MLX). Prefer a JSON "
    "caption; bboxes are [y_min, x_min, y_max, x_max] in 0..1000."
)


# Run in a subprocess (never in the server): mlx.core can fail to import on a machine whose
# wheel does not fit it (a CUDA build without libcuda, two mlx backends sharing libmlx.so).
_MLX_PROBE = """
from kiapi_ideogram4.blas import ensure_fast_blas
from kiapi_ideogram4.settings import get_settings
blas = ensure_fast_blas(get_settings().blas)
import mlx.core as mx
mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))
print(f"mlx {mx.__version__} on {mx.default_device()}; BLAS: {blas}")
"""
MLX_CHECK = HealthCheck(
    "mlx",
    python_check(_MLX_PROBE, timeout_s=120),
    description="mlx.core imports and computes on its default device",
)


@hookimpl
def register_health_checks(register: Callable[[HealthCheck], None]) -> None:
    register(MLX_CHECK)


@hookimpl
def register_capabilities(register: Callable[[Capability], None]) -> None:
    register(
        Capability(
            name=FAMILY, domain=DOMAIN, title="kiapi Ideogram 4 API", description=DESCRIPTION
        )
    )


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    for spec in MODELS:
        register(spec)


@hookimpl
def register_routes() -> list[BaseRoute]:
    return list(routes)


@hookimpl
def register_openapi() -> dict[str, Any]:
    # Reused from an earlier start while neither this plugin's nor the host's sources changed
    # (the fragment refers to host models) nor the configured default preset it documents.
    return cached_fragment(
        "ideogram4",
        fragment,
        packages=["kiapi_ideogram4", "kiapi_core"],
        inputs=get_settings().default_preset,
    )


def _generate(ctx: Any) -> dict[str, Any]:
    # Imported on first use: the handler module pulls in nothing heavy itself, but keeping
    # the plugin module minimal makes its import cost obvious.
    from kiapi_ideogram4.handler import generate

    return generate(ctx)


@hookimpl
def register_job_handlers(register: Callable[[str, JobHandler], None]) -> None:
    register(JOB_TYPE, _generate)


@hookimpl
def register_image_generators(register: Callable[[ImageGenerator], None]) -> None:
    # POST /v1/images/generations with model fp8 / ideogram4 / ideogram-4 runs these jobs.
    register(ImageGenerator(family=FAMILY, job_type=JOB_TYPE, prepare=prepare_images))
