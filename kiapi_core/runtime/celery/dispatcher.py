"""The Celery side of the celery backend: app, dispatch, cross-node events, the sweeper.

A message carries only the job id; everything else is in the Redis job store, so a message
delivered twice, late, or to another machine is harmless: the worker claims the job by id and
drops the message when the job is finished or held by a live lease.

Queues are job types (``echo``, ``ideogram4``): a ``kiapi worker`` consumes exactly the types it
serves, so a job only reaches a machine whose plugin is loaded and whose model is active.

Flower (monitoring) needs this app's broker settings, key prefix included::

    KIAPI_REDIS_URL=redis://... celery -A kiapi_core.runtime.celery.dispatcher flower
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery

from kiapi_core.jobs.events import JobEvents
from kiapi_core.jobs.status import TERMINAL
from kiapi_core.jobs.store import JobRecord
from kiapi_core.models.routing import LOAD_JOB
from kiapi_core.runtime.celery.routing import ClusterModels, choose_worker, worker_queue
from kiapi_core.settings import Settings
from kiapi_core.state.redis import (
    RedisJobStore,
    WorkerDirectory,
    event_job_id,
    job_from_event,
)
from kiapi_core.state.redis_previews import preview_from_event

if TYPE_CHECKING:
    from kiapi_core.files.store import FileStore
    from kiapi_core.node import Backend

log = logging.getLogger("kiapi.celery")

TASK = "kiapi.run_job"
# A created job whose message is not confirmed sent after this long is sent by the sweeper
# (its API node died between the two steps, or the broker refused the message).
UNDISPATCHED_GRACE_S = 10.0
ORPHAN_SWEEP_S = 3600


def make_celery(settings: Settings) -> Celery:
    if settings.redis_url is None:
        raise ValueError("KIAPI_REDIS_URL is not set")
    visibility = settings.celery_visibility_timeout_s
    app = Celery("kiapi", broker=settings.redis_url.get_secret_value(), set_as_current=False)
    app.conf.update(
        broker_transport_options={
            # A message a lost worker held goes back to its queue after this long.
            "visibility_timeout": visibility,
            # Check for such messages often enough that the timeout is what decides.
            "unacked_restore_interval": max(1, min(10, int(visibility / 4))),
            "unacked_restore_throttle": 1,
            # Every Celery key (queues, unacked, bindings) under our prefix too.
            "global_keyprefix": f"{settings.redis_prefix}:celery:",
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
        },
        broker_connection_retry_on_startup=True,
        # Ack after the job, not before: a message whose worker dies is delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One job at a time per slot; a busy worker holds no message another could run.
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        # Task events cost a publish each; Flower switches them on in the workers it watches.
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # A broker hiccup must not abandon a running generation (its lease keeps it ours).
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def send(app: Celery, job_id: str, job_type: str, node: str | None = None) -> None:
    """One message for one job, on its type's queue, or on ``node``'s own queue for a job
    routed there (routing.py); ``shadow`` names it in Flower."""
    app.send_task(
        TASK,
        args=[job_id] if node is None else [job_id, True],
        queue=job_type if node is None else worker_queue(node),
        shadow=f"kiapi.{job_type}",
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5},
    )


class EventBridge:
    """Feeds ``P:events`` (every job change, from any node) into this node's ``JobEvents``.

    After a reconnect every follower re-reads its job: messages may have been missed.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        events: JobEvents,
        on_load_ended: Callable[[], None] | None = None,
    ) -> None:
        self.r = client
        self.channel = f"{prefix}:events"
        self.events = events
        # A model just loaded somewhere: the routing view is read again at once, or a job
        # sent right after the load's answer would find it nowhere (the view is 0.25 s old).
        self.on_load_ended = on_load_ended
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kiapi-events", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self.r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.channel)
                self.events.publish_queue_moved()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message["type"] == "message":
                        self._deliver(message["data"])
            except (redis.RedisError, OSError) as exc:
                log.warning("job events from Redis interrupted (%s); reconnecting", exc)
                self._stop.wait(1.0)
            except Exception:
                log.exception("bad job event")
            finally:
                pubsub.close()

    def _deliver(self, data: str) -> None:
        preview = preview_from_event(data)
        if preview is not None:
            self.events.publish_preview(preview)
            return
        job_id = event_job_id(data)
        if self.on_load_ended is not None and LOAD_JOB in data:
            _, job = job_from_event(data)
            if job is not None and job.type == LOAD_JOB and job.status in TERMINAL:
                self.on_load_ended()
        if not job_id:
            self.events.publish_queue_moved()
        else:
            self.events.publish(job_id)  # a waiter (if any) re-reads the store


class Sweeper:
    """What Celery cannot see, checked by one node at a time (a Redis lock).

    - A running job whose lease lapsed lost its worker (SIGKILL, power, network): it is
      re-queued and sent again, or ends after KIAPI_MAX_ATTEMPTS runs (or canceled, when a
      cancel was asked for), its files deleted. Celery's own redelivery of the unacknowledged
      message (visibility timeout) does the same later; whichever comes second finds the job
      taken and is dropped.
    - A queued job whose message was never confirmed sent is sent.
    - Hourly, files left half-written in the shared directory by lost nodes are removed.
    """

    def __init__(
        self, settings: Settings, store: RedisJobStore, files: FileStore, app: Celery, node: str
    ) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.app = app
        self.node = node
        self.interval = max(0.25, min(settings.job_lease_s / 3, 10.0))
        self._lock_key = f"{settings.redis_prefix}:sweeper"
        self._orphans_key = f"{settings.redis_prefix}:orphan-sweep"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kiapi-sweeper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except redis.ConnectionError as exc:
                log.warning("sweeping lost jobs failed (%s); retrying", exc)
            except Exception:
                log.exception("sweeping lost jobs failed; retrying")

    def sweep(self) -> None:
        lease_ms = max(1, int(self.interval * 1000))
        if not self.store.r.set(self._lock_key, self.node, nx=True, px=lease_ms):
            return  # another node sweeps this round
        for job_id in self.store.expire_deadlines():
            log.info("job %s: deadline passed before start; canceled", job_id)
        for job_id, job_type, outcome in self.store.requeue_lapsed(self.settings.max_attempts):
            if outcome == "queued":
                log.warning("job %s lost its worker; re-queued", job_id)
                self._send(job_id, job_type)
            else:
                log.warning("job %s lost its worker and ended %s", job_id, outcome)
                self.files.delete_for_job(job_id)
        for job in self.store.undispatched(UNDISPATCHED_GRACE_S):
            log.warning("job %s was never sent to a worker; sending it", job.id)
            self._send(job.id, job.type)
        self._reroute_orphans()
        # Temp files and unrecorded blobs that dead nodes left in the shared directory: once
        # an hour for the whole cluster (they are only removed once older than that).
        if self.store.r.set(self._orphans_key, self.node, nx=True, ex=ORPHAN_SWEEP_S):
            self.files.remove_orphans()

    def _send(self, job_id: str, job_type: str) -> None:
        send(self.app, job_id, job_type)
        self.store.mark_dispatched(job_id)

    def _reroute_orphans(self) -> None:
        """Jobs routed to a worker's own queue that are still queued while that worker left
        the directory go to their shared queue; entries of jobs no longer queued are dropped."""
        routed = self.store.routed()
        if not routed:
            return
        directory = WorkerDirectory(self.store.r, self.settings.redis_prefix)
        live = {w.get("node") for w in directory.live()}
        for job_id, node in routed.items():
            job = self.store.get(job_id)
            if job is not None and job.status == "queued" and node in live:
                continue
            if self.store.unroute(job_id) and job is not None:
                log.warning("job %s waited for worker %s, which is gone; re-sent", job_id, node)
                self._send(job.id, job.type)


class CeleryDispatcher:
    """The API node's ``Dispatcher``: sends jobs, listens to events, sweeps."""

    def __init__(self, backend: Backend, node: str) -> None:
        store = getattr(backend.store, "target", backend.store)  # unwrap ``Guarded``
        if not isinstance(store, RedisJobStore):
            raise TypeError("the celery dispatcher needs the Redis job store")
        self.store = store
        self.app = make_celery(backend.settings)
        self.sweeper = Sweeper(backend.settings, store, backend.files, self.app, node)
        self.directory = WorkerDirectory(store.r, backend.settings.redis_prefix)
        self.settings = backend.settings
        self.models = ClusterModels(store.r, backend.settings.redis_prefix, self.directory)
        self.bridge = EventBridge(
            store.r, backend.settings.redis_prefix, backend.events, self.models.refresh
        )

    def start(self) -> None:
        self.models.start()
        self.bridge.start()
        self.sweeper.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.sweeper.stop(timeout)
        self.bridge.stop(timeout)
        self.models.stop(timeout)
        self.app.close()

    def describe(self) -> dict[str, Any]:
        """The live ``kiapi worker``s, from their entries in the worker directory."""
        self.models.refresh()  # as read now: a worker that just announced itself is listed
        live = self.models.live()
        backlog = self.models.backlog()
        if live is None:
            return {"mode": "celery", "workers": None, "error": "Redis did not answer"}
        keys = ("node", "host", "pid", "types", "concurrency", "started_at", "queue")
        return {
            "mode": "celery",
            "workers": [
                {
                    **{k: w.get(k) for k in keys},
                    "resident": [r.get("key") for r in w.get("resident") or []],
                    "loads": w.get("load_counts") or {},
                    "running": w.get("running", 0),
                    "routed_waiting": backlog.get(str(w.get("node")), 0),
                }
                for w in live
            ],
        }

    def dispatch(self, job: JobRecord) -> None:
        node = None
        if self.settings.route_by_residency:
            node = choose_worker(job, self.models.live() or [], self.models.backlog())
        try:
            # Routed first (remembered for the sweeper, should that worker go away); a job
            # another message already ran is sent as a turn of its shared queue.
            if node is not None and not self.store.route(job.id, node):
                node = None
            if node is not None:
                self.models.routed_to(node)
            send(self.app, job.id, job.type, node)
            self.store.mark_dispatched(job.id)
        except Exception:
            # The job is safe in the store; the sweeper sends it once the broker answers.
            log.exception("sending job %s to the broker failed; it will be retried", job.id)


def __getattr__(name: str) -> Any:
    # ``celery -A kiapi_core.runtime.celery.dispatcher flower`` looks for ``app``: built from the
    # environment on first access only, so importing this module needs no settings.
    if name == "app":
        return make_celery(Settings())
    raise AttributeError(name)
