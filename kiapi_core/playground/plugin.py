"""Default plugin ``kiapi.playground``: the browser page at /playground and its static files."""

from __future__ import annotations

from typing import Any

from starlette.routing import BaseRoute

from kiapi_core.hookspecs import hookimpl
from kiapi_core.playground import fragment, routes
from kiapi_core.settings import Settings


@hookimpl
def register_routes(settings: Settings) -> list[BaseRoute]:
    return list(routes)


@hookimpl
def register_openapi() -> dict[str, Any]:
    return fragment()
