"""The running host's parts, reachable from any route as ``host(request)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

if TYPE_CHECKING:
    from kiapi_core.files.store import FileStore
    from kiapi_core.jobs.service import JobService, StoreCall
    from kiapi_core.models.manager import ModelsView
    from kiapi_core.models.weights import WeightsRegistry
    from kiapi_core.plugins import Registry
    from kiapi_core.settings import Settings
    from kiapi_core.state.sqlite import Database


@dataclass
class Host:
    """The running server's parts, as a route sees them (``host_of(request)``).

    For plugins: ``settings``, ``registry.models_for(family)`` (the registered ``ModelSpec``s of
    a family), ``weights`` (for ``missing_weights``), ``files`` and ``call`` (run a store call from the
    event loop: one that finds the embedded database locked is re-run off the loop). The other attributes are the host's own.
    """

    settings: Settings
    registry: Registry
    db: Database | None  # None with the celery backend: no local state
    files: FileStore
    jobs: JobService
    models: ModelsView
    weights: WeightsRegistry
    started_at: float
    # How routes call the stores from the event loop (never waiting there on a lock).
    call: StoreCall

    def openapi(self) -> dict[str, Any]:
        return self.registry.openapi.doc


def host(request: Request) -> Host:
    """The host serving ``request`` (public as ``kiapi_core.host_of``)."""
    state: Host = request.app.state.kiapi
    return state
