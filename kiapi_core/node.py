"""What one kiapi node is made of: which job store, file metadata and dispatcher it uses (DESIGN §9, docs/scale-out.md).

``KIAPI_BACKEND=embedded`` (the default): SQLite under KIAPI_HOME, jobs run by a worker process
the server starts (``KIAPI_WORKER_MODE=process``) or by threads of the server (``thread``).
``KIAPI_BACKEND=celery``: job and file state in Redis, jobs sent to ``kiapi worker`` processes
through Celery; the API node runs no job itself.

Routes only ever see the ``JobService`` built on top, so both serve the same API. This module
imports neither celery nor redis: the embedded default stays dependency-free and quick to start.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    # Imported where used: importing this module must not pull in every store and runtime
    # (nor celery and redis) with it.
    from kiapi_core.files.store import FileStore
    from kiapi_core.jobs.context import JobHandler
    from kiapi_core.jobs.events import JobEvents
    from kiapi_core.jobs.previews import PreviewStore
    from kiapi_core.jobs.service import Dispatcher, StoreCall
    from kiapi_core.jobs.store import JobStore
    from kiapi_core.models.manager import ModelsView
    from kiapi_core.models.spec import ModelSpec
    from kiapi_core.models.weights import WeightsRegistry
    from kiapi_core.plugin_refs import PluginRef
    from kiapi_core.settings import Settings
    from kiapi_core.state.sqlite import Database
    from kiapi_core.webhooks.outbox import Outbox


def _events() -> JobEvents:
    from kiapi_core.jobs.events import JobEvents

    return JobEvents()


@dataclass
class Backend:
    """The stateful parts of a node; ``dispatcher()`` adds what runs its jobs."""

    settings: Settings
    files: FileStore
    store: JobStore
    weights: WeightsRegistry
    events: JobEvents = field(default_factory=_events)
    db: Database | None = None
    # Where webhook deliveries wait (the same store as the jobs: written with their changes).
    outbox: Outbox | None = None
    # The latest live preview per running job: in this process (embedded), or in Redis.
    previews: PreviewStore | None = None

    def __post_init__(self) -> None:
        if self.previews is None:
            from kiapi_core.jobs.previews import MemoryPreviews

            self.previews = MemoryPreviews(on_put=self.events.publish_preview)

    @property
    def call(self) -> StoreCall:
        """How the event loop calls this node's stores (never waiting on a lock)."""
        if self.db is not None:
            return self.db.call
        from kiapi_core.jobs.service import call_in_thread

        return call_in_thread

    def dispatcher(
        self,
        *,
        handlers: Mapping[str, JobHandler],
        plugin_of: Mapping[str, str] | None = None,
        in_code: list[PluginRef] | None = None,
        catalog: Sequence[ModelSpec] = (),
    ) -> tuple[Dispatcher, ModelsView]:
        """What runs this node's jobs, and the view of the models they load.

        ``plugin_of``: each job type's plugin (its handlers' data directory). ``in_code``: the
        plugins registered in code that the worker process loads too; None when one of them
        cannot be named, so the embedded backend runs jobs on threads of this process.
        """
        from kiapi_core.models.manager import ModelManager

        settings = self.settings
        if settings.backend == "celery":
            from kiapi_core.runtime.celery.dispatcher import CeleryDispatcher

            node = f"api-{socket.gethostname()}-{os.getpid()}"
            dispatcher = CeleryDispatcher(self, node=node)
            return dispatcher, dispatcher.models
        if settings.worker_mode == "process" and in_code is not None:
            from kiapi_core.runtime.process import ModelMirror, ProcessPool

            mirror = ModelMirror(settings.memory_limit_gb)
            pool = ProcessPool(
                store=self.store,
                files=self.files,
                settings=settings,
                events=self.events,
                models=mirror,
                in_code=in_code,
                previews=self.previews,
            )
            return pool, mirror
        from kiapi_core.runtime.threads import WorkerPool

        if settings.worker_max_rss_mb:
            # The worker is the server itself here: it cannot be replaced between jobs.
            logging.getLogger("kiapi.worker").warning(
                "KIAPI_WORKER_MAX_RSS_MB applies to KIAPI_WORKER_MODE=process only; ignored"
            )
        models = ModelManager(
            settings.memory_limit_gb, settings.model_idle_ttl_s, self.weights, catalog=catalog
        )
        threads = WorkerPool(
            store=self.store,
            files=self.files,
            models=models,
            settings=settings,
            handlers=handlers,
            events=self.events,
            plugin_of=plugin_of,
            previews=self.previews,
        )
        return threads, models


def build_backend(settings: Settings) -> Backend:
    if settings.backend == "celery":
        return _redis_backend(settings)
    from kiapi_core.files.store import FileStore
    from kiapi_core.jobs.store import SqliteJobStore
    from kiapi_core.models.weights import WeightsRegistry
    from kiapi_core.state.sqlite import Database
    from kiapi_core.webhooks.outbox import SqliteOutbox

    db = Database(
        settings.db_path,
        wait_s=settings.store_busy_timeout_s,
        reserve_bytes=settings.disk_reserve_bytes,
    )
    return Backend(
        settings=settings,
        files=FileStore(settings.files_dir, db),
        store=SqliteJobStore(db, settings.events_retain),
        weights=WeightsRegistry(settings.home),
        db=db,
        outbox=SqliteOutbox(db),
    )


def _redis_backend(settings: Settings) -> Backend:
    from kiapi_core.state.redis import (
        ClusterWeights,
        Guarded,
        RedisJobStore,
        RedisOutbox,
        WorkerDirectory,
        connect,
        redis_files,
    )
    from kiapi_core.state.redis_previews import RedisPreviews

    client = connect(settings)
    directory = WorkerDirectory(client, settings.redis_prefix)
    return Backend(
        previews=RedisPreviews(client, settings.redis_prefix),
        settings=settings,
        files=redis_files(settings, client, guarded=True),
        store=cast(
            "JobStore",
            Guarded(RedisJobStore(client, settings.redis_prefix, settings.events_retain)),
        ),
        weights=ClusterWeights(settings.home, directory),
        outbox=RedisOutbox(client, settings.redis_prefix),
    )
