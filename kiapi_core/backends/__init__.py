"""Which job store, file metadata and dispatcher a node uses (DESIGN §9, docs/scale-out.md).

``KIAPI_BACKEND=embedded`` (the default): SQLite under KIAPI_HOME and the in-process
``WorkerPool``. ``KIAPI_BACKEND=celery``: job and file state in Redis, jobs sent to
``kiapi worker`` processes through Celery; the API node runs no job itself.

Routes only ever see the ``JobService`` built on top, so both serve the same API. This module
imports neither celery nor redis: the embedded default stays dependency-free and quick to start.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Imported where used: `kiapi worker` (backends.cli) is registered with the CLI at import,
    # and importing this package must not pull in the stores (and pydantic) with it.
    from kiapi_core.db import Database
    from kiapi_core.files.store import FileStore
    from kiapi_core.jobs.context import JobHandler
    from kiapi_core.jobs.events import JobEvents
    from kiapi_core.jobs.service import Dispatcher
    from kiapi_core.jobs.store import JobStore
    from kiapi_core.models.manager import ModelManager
    from kiapi_core.models.weights import WeightsRegistry
    from kiapi_core.settings import Settings


def _events() -> JobEvents:
    from kiapi_core.jobs.events import JobEvents

    return JobEvents()


@dataclass
class Backend:
    """The stateful parts of a node. ``dispatcher()`` is built once the models exist."""

    settings: Settings
    files: FileStore
    store: JobStore
    weights: WeightsRegistry
    events: JobEvents = field(default_factory=_events)
    db: Database | None = None

    def dispatcher(self, *, models: ModelManager, handlers: Mapping[str, JobHandler]) -> Dispatcher:
        if self.settings.backend == "celery":
            from kiapi_core.backends.celery_app import CeleryDispatcher

            return CeleryDispatcher(self, node=f"api-{socket.gethostname()}-{os.getpid()}")
        from kiapi_core.jobs.worker import WorkerPool

        return WorkerPool(
            store=self.store,
            files=self.files,
            models=models,
            settings=self.settings,
            handlers=handlers,
            events=self.events,
        )


def build_backend(settings: Settings) -> Backend:
    if settings.backend == "celery":
        from kiapi_core.backends.redis_store import build_redis_backend

        return build_redis_backend(settings)
    from kiapi_core.db import Database
    from kiapi_core.files.store import FileStore
    from kiapi_core.jobs.store import SqliteJobStore
    from kiapi_core.models.weights import WeightsRegistry

    db = Database(settings.db_path)
    return Backend(
        settings=settings,
        files=FileStore(settings.files_dir, db),
        store=SqliteJobStore(db),
        weights=WeightsRegistry(settings.home),
        db=db,
    )
