"""Default plugin ``kiapi.images``: OpenAI's ``POST /v1/images/generations`` over every image
capability that registers an image generator."""

from __future__ import annotations

from typing import Any

from starlette.routing import BaseRoute

from kiapi_core.hookspecs import hookimpl
from kiapi_core.images.openapi import fragment
from kiapi_core.images.routes import routes
from kiapi_core.settings import Settings
from kiapi_core.web.openapi import cached_fragment


@hookimpl
def register_routes(settings: Settings) -> list[BaseRoute]:
    return list(routes)


@hookimpl
def register_openapi() -> dict[str, Any]:
    return cached_fragment("kiapi.images", fragment, packages=["kiapi_core"])
