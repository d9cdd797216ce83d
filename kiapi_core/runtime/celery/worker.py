"""``kiapi worker``: runs jobs for API nodes with KIAPI_BACKEND=celery, on any machine.

The process loads the same plugins as an API node and consumes the Celery queues of the job
types it can serve (handler loaded, model active here). Each job runs on one of
``--concurrency`` threads of Celery's ``threads`` pool (never a forked child per job: MLX keeps
per-thread state and models stay warm in this process between jobs), through the same
``WorkerPool.execute`` the embedded backend uses, so progress, cancellation, timeouts and
artifacts behave the same.

Exactly-once-in-effect, on at-least-once delivery:

- The message carries the job id only. ``claim`` in Redis decides who runs it: a queued job
  is taken; a running job with a live lease means the message is a redelivery while its worker
  lives (dropped, acked); a lapsed lease means that worker was lost (taken over); a finished
  job is dropped.
- While a job runs, a keeper thread renews its lease every third of KIAPI_JOB_LEASE_S. If
  renewal finds the job taken over (this worker was cut off for longer than the lease), the
  handler is stopped at its next progress report and its output discarded.
- Artifact ids derive from (job id, attempt, index); a run that takes a job over first deletes
  the files earlier runs left, and a successful run deletes any file of its job that is not
  one of its artifacts. A retried job cannot leave duplicates.

A job whose handler ignores its cancel for KIAPI_CANCEL_GRACE_S (checked at each lease renewal)
ends ``canceled`` and its files go; its thread cannot be killed and stays busy until the
handler returns, whose output is then dropped. Results over KIAPI_MAX_RESULT_BYTES fail their
job here too (``WorkerPool.execute``). KIAPI_WORKER_MAX_RSS_MB does not apply: one process
serves every thread, and Celery's thread pool cannot replace it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Reject

from kiapi_core.jobs.context import JobHandler
from kiapi_core.jobs.events import JobEvents
from kiapi_core.jobs.status import ErrorKind
from kiapi_core.jobs.store import JobRecord
from kiapi_core.models.manager import ModelManager
from kiapi_core.models.spec import ModelSpec
from kiapi_core.models.weights import WeightsRegistry, activation_command
from kiapi_core.plugins import Registry
from kiapi_core.runtime import collector
from kiapi_core.runtime.celery.dispatcher import TASK, Sweeper, make_celery, send
from kiapi_core.runtime.celery.routing import control_channel, worker_queue
from kiapi_core.runtime.execute import Outcome
from kiapi_core.runtime.priority import lower_thread_priority
from kiapi_core.runtime.threads import WorkerPool
from kiapi_core.settings import Settings
from kiapi_core.state.redis import (
    RedisJobStore,
    RedisOutbox,
    WorkerDirectory,
    connect,
    redis_files,
)
from kiapi_core.state.redis_previews import RedisPreviews
from kiapi_core.webhooks.delivery import deliverer_for

log = logging.getLogger("kiapi.worker")


def serving(
    registry: Registry, weights: WeightsRegistry
) -> tuple[dict[str, list[ModelSpec]], dict[str, str]]:
    """Job types this machine can run, with their active models; and why the others cannot.

    A type is served when its handler is loaded and its plugin needs no weights or has at
    least one model whose weights are activated here.
    """
    active: dict[str, list[ModelSpec]] = {}
    missing: dict[str, str] = {}
    for job_type in registry.handlers:
        owner = registry.owner.get(("job type", job_type))
        specs = [
            s
            for s in registry.models
            if registry.owner.get(("model", f"{s.family}/{s.name.lower()}")) == owner
        ]
        ready = [s for s in specs if s.weights is None or weights.path_for(s) is not None]
        if specs and not ready:
            missing[job_type] = f"no active model; run: {activation_command(specs[0])}"
        else:
            active[job_type] = ready
    return active, missing


class WorkerRuntime:
    """One ``kiapi worker`` process: its stores, models, leases, and the Celery task body."""

    def __init__(
        self,
        settings: Settings,
        *,
        node: str,
        handlers: Mapping[str, JobHandler],
        plugin_of: Mapping[str, str],
        models: Mapping[str, list[ModelSpec]],
        concurrency: int,
    ) -> None:
        self.settings = settings
        self.node = node
        self.client = connect(settings)
        self._lock = threading.Lock()
        self._announce_lock = threading.Lock()
        self._leases: dict[str, str] = {}
        self._lost: set[str] = set()
        self._handing_back = False
        self.app: Celery | None = None
        self.store = RedisJobStore(self.client, settings.redis_prefix, settings.events_retain)
        self.files = redis_files(settings, self.client)
        self.weights = WeightsRegistry(settings.home)
        self.models = ModelManager(
            settings.memory_limit_gb,
            settings.model_idle_ttl_s,
            self.weights,
            on_change=self._models_changed,
            catalog={s.key: s for specs in models.values() for s in specs}.values(),
        )
        self.directory = WorkerDirectory(self.client, settings.redis_prefix)
        self.pool = WorkerPool(
            store=self.store,
            files=self.files,
            models=self.models,
            settings=settings,
            handlers=handlers,
            plugin_of=plugin_of,
            events=JobEvents(),  # no event loop here: changes reach API nodes via Redis
            previews=RedisPreviews(self.client, settings.redis_prefix),
            is_canceled=self._is_canceled,
            end=self._end,
        )
        self.info: dict[str, Any] = {
            "node": node,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "types": sorted(handlers),
            "models": {
                spec.key: str(self.weights.path_for(spec) or "")
                for specs in models.values()
                for spec in specs
                if spec.weights is not None
            },
            "concurrency": concurrency,
            "started_at": time.time(),
            # Residency-aware routing (routing.py): this worker's own queue, what it can load.
            "queue": worker_queue(node),
            "serves_models": sorted({s.key for specs in models.values() for s in specs}),
        }
        self._slots = threading.local()
        self._slot_count = 0
        self._ready = False
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self.sweeper: Sweeper | None = None
        # Webhooks of the jobs it runs (and any other's): from the outbox every node shares.
        self.deliverer = (
            deliverer_for(settings, RedisOutbox(self.client, settings.redis_prefix), node)
            if settings.webhook_deliver
            else None
        )

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, app: Celery) -> None:
        self.app = app
        self.sweeper = Sweeper(self.settings, self.store, self.files, app, self.node)
        self.sweeper.start()
        self._keeper = threading.Thread(target=self._keep, name="kiapi-leases", daemon=True)
        self._keeper.start()
        if self.deliverer is not None:
            self.deliverer.start()
        threading.Thread(target=self._listen, name="kiapi-control", daemon=True).start()

    def ready(self) -> None:
        """Consuming now: tell API nodes what this worker serves."""
        # As in the server: without it, full collections scanned celery, kombu and the plugins
        # (12-50 ms every ~0.4 s while jobs reported progress at 20 Hz).
        collector.settle()
        self._ready = True
        self._announce()
        log.info("worker %s serving %s", self.node, ", ".join(self.info["types"]))

    def hand_back(self) -> None:
        """Stop now: running jobs end at their next progress report and go back to their
        queues, where another worker runs them from the start (SIGQUIT, a second Ctrl-C)."""
        if not self._handing_back:
            log.warning("handing running jobs back to their queues")
        self._handing_back = True
        self.pool.stop(timeout=0)  # sets the flag every job context checks; no thread to join

    # -- how this runtime's jobs see cancels and end ----------------------------------------
    def _is_canceled(self, job_id: str) -> bool:
        """A job whose lease was lost reads as canceled: it stops at its next progress report
        (the job runs elsewhere by now)."""
        return job_id in self._lost or self.store.cancel_requested(job_id)

    def _end(self, job: JobRecord, worker: str, outcome: Outcome, artifacts: list[str]) -> bool:
        """A job interrupted because this worker hands its jobs back ends queued again, not
        failed: released and its message re-sent. Every other end is recorded as usual."""
        if outcome.kind == ErrorKind.interrupted and self._handing_back:
            job_type = self.store.release(job.id, worker)
            if job_type is not None:
                log.warning("job %s handed back to its queue (this worker is stopping)", job.id)
                self._resend(job.id, job_type)
            return False  # not finished by this run: its output goes
        return self.pool.record(job, worker, outcome, artifacts)

    def _resend(self, job_id: str, job_type: str) -> None:
        try:
            if self.app is None:
                raise RuntimeError("not started")
            send(self.app, job_id, job_type)
            self.store.mark_dispatched(job_id)
        except Exception:
            log.exception("re-sending job %s failed; the sweeper sends it", job_id)

    def close(self) -> None:
        self._stop.set()
        if self.sweeper is not None:
            self.sweeper.stop()
        if self.deliverer is not None:
            self.deliverer.stop()
        try:
            self.directory.withdraw(self.node)
        except redis.RedisError:
            log.warning("could not withdraw %s from the worker directory", self.node)
        self.models.unload_all()

    def _announce(self) -> None:
        # Read and written under one lock: two threads' announcements never land reordered.
        with self._announce_lock:
            state = self.models.export()
            resident = [r for r in state.pop("status") if not r["transient"]]
            with self._lock:
                running = len(self._leases)
            info = {**self.info, **state, "resident": resident, "running": running}
            self.directory.announce(self.node, info, ttl_s=max(3.0, self.settings.job_lease_s))

    def _models_changed(self) -> None:
        # At once, not at the next heartbeat: API nodes route the next job by it.
        if self._ready:
            try:
                self._announce()
            except redis.RedisError:
                log.warning("announcing this worker's models failed; retried at the heartbeat")

    def _listen(self) -> None:
        """Control messages for every worker (``P:control``): unload a model if idle here."""
        while not self._stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(control_channel(self.settings.redis_prefix))
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is None or message["type"] != "message":
                        continue
                    order = json.loads(message["data"])
                    if order.get("op") == "unload":
                        outcome = self.models.unload(str(order.get("model")))
                        log.info("unload %s asked: %s", order.get("model"), outcome)
            except (redis.RedisError, OSError) as exc:
                log.warning("control messages interrupted (%s); reconnecting", exc)
                self._stop.wait(1.0)
            except Exception:
                log.exception("bad control message")
            finally:
                pubsub.close()

    def _keep(self) -> None:
        """Renew the leases of running jobs; refresh this worker's entry; unload idle models."""
        lease = self.settings.job_lease_s
        last_sweep = time.monotonic()
        cancel_seen: dict[str, float] = {}
        while not self._stop.wait(lease / 3):
            with self._lock:
                leases = dict(self._leases)
            try:
                lost = self.store.renew(leases, lease)
                if lost:
                    log.error("lost the lease of %s (cut off too long); stopping them", lost)
                    with self._lock:
                        self._lost.update(lost)
                if self._ready:
                    self._announce()
                self._end_hung_cancels(leases, cancel_seen)
            except redis.ConnectionError as exc:
                log.warning("renewing leases failed (%s); retrying", exc)
            except redis.RedisError:
                log.warning("renewing leases failed; retrying", exc_info=True)
            if time.monotonic() - last_sweep >= self.settings.sweep_interval_s:
                last_sweep = time.monotonic()
                try:
                    self.models.sweep_idle()
                except Exception:
                    log.exception("unloading idle models failed")

    def _end_hung_cancels(self, leases: dict[str, str], seen: dict[str, float]) -> None:
        """End ``canceled`` the jobs whose cancel went unheeded for KIAPI_CANCEL_GRACE_S."""
        grace = self.settings.cancel_grace_s
        now = time.monotonic()
        flagged = {j for j in leases if j not in self._lost and self.store.cancel_requested(j)}
        for job_id in list(seen):
            if job_id not in flagged:
                del seen[job_id]
        for job_id in flagged:
            if now - seen.setdefault(job_id, now) < grace:
                continue
            if self.store.finish(
                job_id,
                "canceled",
                worker=leases[job_id],
                error=f"canceled by request (the handler did not stop within"
                f" KIAPI_CANCEL_GRACE_S={grace:g}s and was abandoned)",
                error_kind="canceled",
            ):
                self.files.delete_for_job(job_id)
                log.error("job %s ignored its cancel; abandoned (its thread runs on)", job_id)
            with self._lock:
                self._lost.add(job_id)  # what its handler still writes is dropped
            del seen[job_id]

    # -- one job ---------------------------------------------------------------------------
    def _slot(self) -> int:
        slot: int | None = getattr(self._slots, "n", None)
        if slot is None:
            with self._lock:
                slot = self._slot_count
                self._slot_count += 1
            self._slots.n = slot
            # Model threads yield to the control plane (KIAPI_WORKER_NICE), as embedded.
            lower_thread_priority(self.settings.worker_nice)
        return slot

    def run(self, job_id: str, routed: bool = False) -> str:
        """The Celery task body: claim ``job_id`` and run it here, or drop the message.
        ``routed``: it came from this worker's own queue (residency-aware routing)."""
        worker = f"{self.node}/{self._slot()}"
        s = self.settings
        outcome, job = self.store.claim(job_id, worker, s.job_lease_s, s.max_attempts, routed)
        if job is None:
            if outcome in ("failed", "canceled"):
                # Its previous worker was lost and the job ended here: drop what it left.
                self.files.delete_for_job(job_id)
            log.info("job %s: %s; message dropped", job_id, outcome)
            return outcome
        owner = job.worker or worker
        with self._lock:
            self._leases[job.id] = owner
        self._models_changed()  # its load ("running") routes the next jobs
        try:
            if job.attempt > 1:
                left = self.files.delete_for_job(job.id)
                log.warning(
                    "job %s: run %d replaces an earlier run that did not finish (%d file(s) of"
                    " it deleted)",
                    job.id,
                    job.attempt,
                    left,
                )
            self.pool.execute(job, owner)
            if job.attempt > 1:
                done = self.store.get(job.id)
                if done is not None and done.status == "succeeded" and done.worker == owner:
                    # Anything else of this job (a cut-off earlier run writing late) goes.
                    self.files.delete_for_job(job.id, keep=done.artifacts)
            return "ran"
        finally:
            with self._lock:
                self._leases.pop(job.id, None)
                self._lost.discard(job.id)
            self._models_changed()


def register_task(app: Celery, runtime: WorkerRuntime) -> None:
    @app.task(name=TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)  # type: ignore[untyped-decorator]
    def run_job(job_id: str, routed: bool = False) -> str:
        try:
            return runtime.run(job_id, routed)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # The job store is unreachable: put the message back rather than lose the job.
            log.error("job %s: Redis unreachable (%s); message re-queued", job_id, exc)
            time.sleep(1.0)
            raise Reject(exc, requeue=True) from exc


def _hand_back_on(runtime: WorkerRuntime, signum: signal.Signals) -> None:
    """On ``signum``: hand running jobs back, then stop once they have ended (warm stop)."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread

    def handler(received: int, frame: Any) -> None:
        from celery.worker import state

        runtime.hand_back()
        state.should_stop = 0  # EX_OK

    signal.signal(signum, handler)


def node_name(name: str | None) -> str:
    base = name or f"kiapi{os.getpid()}"
    return base if "@" in base else f"{base}@{socket.gethostname()}"


def run_worker(
    settings: Settings,
    registry: Registry,
    *,
    queues: list[str] | None,
    concurrency: int,
    name: str | None,
    loglevel: str,
) -> int:
    """Start consuming; returns the exit code once Celery stops (SIGTERM: after running jobs)."""
    from celery import signals

    weights = WeightsRegistry(settings.home)
    active, missing = serving(registry, weights)
    for job_type, why in missing.items():
        log.warning("not taking %s jobs: %s", job_type, why)
    if queues:
        unknown = [q for q in queues if q not in active]
        if unknown:
            reasons = [f"{q}: {missing.get(q, 'no such job type here')}" for q in unknown]
            raise ValueError(
                f"cannot serve {', '.join(unknown)} ({'; '.join(reasons)});"
                f" this machine serves: {', '.join(sorted(active)) or 'nothing'}"
            )
        types = list(dict.fromkeys(queues))
    else:
        types = sorted(active)
    if not types:
        raise ValueError(
            "no job type to serve here: install a plugin and activate its model"
            + (f" ({'; '.join(f'{t}: {w}' for t, w in missing.items())})" if missing else "")
        )
    node = node_name(name)
    runtime = WorkerRuntime(
        settings,
        node=node,
        handlers={t: registry.handlers[t] for t in types},
        plugin_of=registry.plugin_of_job_type(),
        models={t: active[t] for t in types},
        concurrency=concurrency,
    )
    app = make_celery(settings)
    register_task(app, runtime)

    def on_ready(**_: Any) -> None:
        runtime.ready()
        _hand_back_on(runtime, signal.SIGQUIT)

    def on_shutting_down(how: str = "", **_: Any) -> None:
        # After a first Ctrl-C (warm: running jobs finish), a second one or SIGQUIT hands them
        # back. Celery's own cold shutdown would wait for them anyway: threads cannot be killed.
        if how == "Warm":
            _hand_back_on(runtime, signal.SIGINT)
            _hand_back_on(runtime, signal.SIGQUIT)

    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutting_down.connect(on_shutting_down, weak=False)
    signals.worker_shutdown.connect(lambda **_: runtime.close(), weak=False)
    runtime.start(app)
    worker = app.Worker(
        hostname=node,
        queues=[*types, worker_queue(node)],
        pool="threads",
        concurrency=concurrency,
        loglevel=loglevel.upper(),
        prefetch_multiplier=1,
        optimization="fair",
        without_mingle=True,
        without_gossip=True,
    )
    worker.start()
    return int(worker.exitcode or 0)
