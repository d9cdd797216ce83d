"""Which models are resident: loads on demand, keeps them warm, evicts under a memory budget.

Called from the threads that run jobs only (model work never runs on the event loop); the lock makes the
bookkeeping safe when several model slots share one manager.

The budget holds what this process really has resident, not only what the catalog says its
models take: a load must fit next to the larger of the two (leaks, allocator caches and
libraries a model imported count too).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kiapi_core.models.spec import LoadOptions, ModelSpec
from kiapi_core.models.weights import WeightsRegistry, activation_command
from kiapi_core.runtime.malloc import give_back_free_memory
from kiapi_core.runtime.rss import rss_bytes

log = logging.getLogger("kiapi.models")


class ModelUnavailable(Exception):
    """A model cannot be served right now (weights missing, memory budget); maps to 503."""


def _options_key(options: LoadOptions) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(options.items()))


# Keep-alive values a job may ask for (X-Kiapi-Keep-Alive, a body's `keep_alive`): seconds
# idle before unloading; these two are special.
KEEP_FOREVER = -1.0  # until memory is needed or an explicit unload
UNLOAD_AFTER = 0.0  # unload as soon as the job is done with it
# How much the latest use moves a model's typical use time: a few uses make it, one odd job
# does not.
RUN_S_WEIGHT = 0.3


@dataclass(frozen=True)
class JobUse:
    """What the job running on this thread asks of the models it uses."""

    keep_alive_s: float | None = None  # None: the server's KIAPI_MODEL_IDLE_TTL_S
    route_keys: tuple[str, ...] = ()  # the job's routing keys (models/routing.py)
    # False for a ``kiapi.load`` job: its use is empty, no measure of how long jobs hold it.
    timed: bool = True


# Set by the runtime around a handler, read by ``use``: handlers keep calling
# ``ctx.models.use(spec)`` unchanged while the request's keep_alive still reaches the model.
_job_use: ContextVar[JobUse | None] = ContextVar("kiapi_job_use", default=None)


@contextmanager
def job_scope(use: JobUse) -> Iterator[None]:
    token = _job_use.set(use)
    try:
        yield
    finally:
        _job_use.reset(token)


@dataclass
class Resident:
    spec: ModelSpec
    options: tuple[tuple[str, Any], ...]
    obj: Any
    memory_gb: float
    last_used: float
    in_use: int = 0
    uses: int = 0
    transient: bool = False
    # The last job's keep_alive (None: the server's idle TTL); the last request wins (Ollama).
    keep_alive_s: float | None = None
    # Routing keys of the jobs served from this model: what a celery worker advertises.
    route_keys: set[str] = field(default_factory=set)
    # What a dispatcher weighs before loading it on a free worker rather than waiting for
    # this one (runtime/celery/routing.py): how long its load took, how long a use lasts.
    load_s: float = 0.0
    run_s: float | None = None  # moving average over its uses; None before the first ends

    @property
    def key(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.spec.key}[{opts}]" if opts else self.spec.key


class ModelsView(Protocol):
    """What the API reports about resident models: the manager itself, or a mirror of the
    manager in the worker process (kiapi_core/runtime/process.py)."""

    @property
    def load_counts(self) -> Counter[str]: ...
    @property
    def transient_counts(self) -> Counter[str]: ...

    def summary(self) -> dict[str, float]: ...
    def status(self) -> list[dict[str, Any]]: ...
    def unload_all(self) -> None: ...
    def request_unload(self, model: str) -> None:
        """Ask for ``model`` (``family/name``, every option set) to be unloaded where it is
        resident, if no job uses it; answered once ``status()`` shows it (or not)."""
        ...


class ModelManager:
    def __init__(
        self,
        limit_gb: float,
        idle_ttl_s: float,
        weights: WeightsRegistry,
        *,
        on_change: Callable[[], None] | None = None,
        rss: Callable[[], int | None] = rss_bytes,
        catalog: Iterable[ModelSpec] = (),
    ) -> None:
        self.limit_gb = limit_gb
        # Every registered model by ``family/name``: what ``kiapi.load`` jobs may warm.
        self.catalog = {spec.key: spec for spec in catalog}
        # This process's resident bytes (None: unknown, the estimates alone count).
        self.rss = rss
        # Called after every load, unload and end of use (outside the locks).
        self.on_change = on_change
        self.idle_ttl_s = idle_ttl_s
        self.weights = weights
        self._lock = threading.RLock()
        self._load_lock = threading.RLock()
        self._residents: dict[str, Resident] = {}
        self._transients: list[Resident] = []
        self.load_counts: Counter[str] = Counter()
        self.transient_counts: Counter[str] = Counter()

    def weights_dir(self, spec: ModelSpec) -> Path | None:
        if spec.weights is None:
            return None
        path = self.weights.path_for(spec)
        if path is None:
            raise ModelUnavailable(
                f"weights for model {spec.name!r} ({spec.family}) are not activated; "
                f"run: {activation_command(spec)}"
            )
        return path

    def used_gb(self) -> float:
        with self._lock:
            return sum(r.memory_gb for r in (*self._residents.values(), *self._transients))

    def held_gb(self) -> tuple[float, float | None]:
        """What counts against the budget, and the real resident GB it came from (if it did)."""
        estimated = self.used_gb()
        rss = self.rss()
        if rss is None or rss / 1024**3 <= estimated:
            return estimated, None
        return rss / 1024**3, rss / 1024**3

    @contextmanager
    def use(
        self, spec: ModelSpec, options: LoadOptions | None = None, *, transient: bool = False
    ) -> Iterator[Any]:
        """Yield the loaded model; a transient one is built for this use only and freed after."""
        opts = dict(options or {})
        if transient:
            try:
                resident = self._load(spec, opts, transient=True)
            finally:
                self._changed()  # also when it failed after evicting others
            try:
                yield resident.obj
            finally:
                with self._lock:
                    self._transients.remove(resident)
                self._free(resident)
                self._changed()
            return
        job = _job_use.get() or JobUse()
        try:
            resident = self._acquire(spec, opts)
        finally:
            self._changed()
        started = time.monotonic()
        try:
            yield resident.obj
        finally:
            with self._lock:
                resident.in_use -= 1
                resident.last_used = time.monotonic()
                if job.timed:
                    ran, previous = resident.last_used - started, resident.run_s
                    resident.run_s = (
                        ran if previous is None else previous + RUN_S_WEIGHT * (ran - previous)
                    )
                resident.keep_alive_s = job.keep_alive_s
                resident.route_keys.update(job.route_keys)
                if job.keep_alive_s == UNLOAD_AFTER and resident.in_use == 0:
                    log.info("unloading %s after its job (keep_alive 0)", resident.key)
                    self._unload(resident)
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("reporting a model change failed")

    def _acquire(self, spec: ModelSpec, opts: dict[str, Any]) -> Resident:
        key = Resident(spec, _options_key(opts), None, 0, 0).key
        # Loads are serialised on their own lock so status reads never wait behind one.
        with self._load_lock:
            with self._lock:
                found = self._residents.get(key)
            if found is None:
                found = self._load(spec, opts, transient=False)
            with self._lock:
                self._residents[key] = found
                found.in_use += 1
                found.uses += 1
                found.last_used = time.monotonic()
            return found

    def _load(self, spec: ModelSpec, opts: dict[str, Any], *, transient: bool) -> Resident:
        weights_dir = self.weights_dir(spec)
        need = spec.memory_for(weights_dir, opts)
        with self._load_lock:
            with self._lock:
                self._make_room(need, spec)
                # Reserve the memory before the slow load so a concurrent load sees it.
                resident = Resident(spec, _options_key(opts), None, need, 0, transient=True)
                self._transients.append(resident)
            self._changed()  # "loading" shows in /health while the load runs
            started = time.monotonic()
            try:
                obj = spec.load(weights_dir, opts)
            finally:
                with self._lock:
                    self._transients.remove(resident)
            now = time.monotonic()
            resident = Resident(
                spec, _options_key(opts), obj, need, now, transient=transient, load_s=now - started
            )
            with self._lock:
                if transient:
                    self.transient_counts[spec.key] += 1
                    self._transients.append(resident)
                else:
                    self.load_counts[resident.key] += 1
        log.info(
            "loaded %s%s in %.2fs (%.1f GB estimated)",
            resident.key,
            " (transient)" if transient else "",
            now - started,
            need,
        )
        return resident

    def _make_room(self, need: float, spec: ModelSpec) -> None:
        if need > self.limit_gb:
            raise ModelUnavailable(
                f"model {spec.name!r} needs about {need:.1f} GB but the memory budget is "
                f"{self.limit_gb:.1f} GB; raise KIAPI_MEMORY_LIMIT_GB"
            )
        idle = sorted(
            (r for r in self._residents.values() if r.in_use == 0),
            key=lambda r: (r.spec.priority, r.last_used),
        )
        held, real = self.held_gb()
        if real is not None and held + need > self.limit_gb:
            give_back_free_memory()  # freed buffers malloc keeps are no model's memory
        while self.held_gb()[0] + need > self.limit_gb and idle:
            victim = idle.pop(0)
            log.info("evicting %s to make room for %s", victim.key, spec.key)
            self._unload(victim)
        held, real = self.held_gb()
        if held + need > self.limit_gb:
            if real is not None:
                raise ModelUnavailable(
                    f"model {spec.name!r} needs about {need:.2f} GB; this worker process already"
                    f" holds {real:.2f} GB (resident; its models are estimated at"
                    f" {self.used_gb():.2f} GB) of the {self.limit_gb:g} GB memory budget"
                    " (KIAPI_MEMORY_LIMIT_GB); retry later"
                )
            raise ModelUnavailable(
                f"model {spec.name!r} needs about {need:.1f} GB; {self.used_gb():.1f} of "
                f"{self.limit_gb:.1f} GB are held by models in use; retry later"
            )

    def _unload(self, resident: Resident) -> None:
        self._residents.pop(resident.key, None)
        self._free(resident)

    def _free(self, resident: Resident) -> None:
        if resident.spec.unload is not None:
            try:
                resident.spec.unload(resident.obj)
            except Exception:
                log.exception("unloading %s failed", resident.key)
        resident.obj = None
        gc.collect()
        give_back_free_memory()  # so the resident set the budget reads shows the unload

    def ttl_of(self, resident: Resident) -> float | None:
        """Seconds idle before ``resident`` is unloaded; None: never by the idle sweep."""
        ttl = self.idle_ttl_s if resident.keep_alive_s is None else resident.keep_alive_s
        return None if ttl < 0 or (resident.keep_alive_s is None and ttl == 0) else ttl

    def expires_at(self, resident: Resident, now: float) -> float | None:
        """Unix time of the idle unload; None while in use or kept."""
        ttl = self.ttl_of(resident)
        if ttl is None or resident.in_use:
            return None
        return round(time.time() + max(0.0, ttl - (now - resident.last_used)), 3)

    def unload(self, model: str) -> str:
        """Unload every resident of ``model`` (``family/name``): ``unloaded``, ``in_use``
        (nothing unloaded: a job holds one) or ``not_resident``."""
        with self._lock:
            found = [r for r in self._residents.values() if r.spec.key == model]
            if any(r.in_use for r in found):
                return "in_use"
            for resident in found:
                log.info("unloading %s on request", resident.key)
                self._unload(resident)
        if found:
            self._changed()
        return "unloaded" if found else "not_resident"

    def request_unload(self, model: str) -> None:
        self.unload(model)

    def sweep_idle(self, now: float | None = None) -> list[str]:
        """Unload residents idle longer than their TTL; returns their keys."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [
                r
                for r in self._residents.values()
                if r.in_use == 0
                and (ttl := self.ttl_of(r)) is not None
                and now - r.last_used >= ttl
            ]
            for resident in stale:
                log.info("unloading %s after %.0fs idle", resident.key, now - resident.last_used)
                self._unload(resident)
        if stale:
            self._changed()
        return [r.key for r in stale]

    def unload_all(self) -> None:
        with self._lock:
            for resident in list(self._residents.values()):
                if resident.in_use == 0:
                    self._unload(resident)
        self._changed()

    def export(self) -> dict[str, Any]:
        """Everything a ``ModelsView`` serves, as JSON (sent from the worker process)."""
        with self._lock:
            return {
                "summary": self.summary(),
                "status": self.status(),
                "load_counts": dict(self.load_counts),
                "transient_counts": dict(self.transient_counts),
            }

    def summary(self) -> dict[str, float]:
        with self._lock:
            return {
                "resident": len(self._residents),
                "transient": sum(1 for r in self._transients if r.obj is not None),
                # Loads under way (their memory reserved): /health's readiness reads it.
                "loading": sum(1 for r in self._transients if r.obj is None),
                "memory_gb_used": round(self.used_gb(), 3),
                "memory_gb_limit": self.limit_gb,
            }

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            return [
                {
                    "key": r.key,
                    "model": r.spec.name,
                    "family": r.spec.family,
                    "options": dict(r.options),
                    "memory_gb": r.memory_gb,
                    "in_use": r.in_use,
                    "uses": r.uses,
                    "idle_s": round(now - r.last_used, 3),
                    "transient": r.transient,
                    "loads": self.transient_counts[r.spec.key]
                    if r.transient
                    else self.load_counts[r.key],
                    "keep_alive_s": r.keep_alive_s,
                    "expires_at": None if r.transient else self.expires_at(r, now),
                    "route_keys": sorted(r.route_keys),
                    "load_s": round(r.load_s, 6),
                    "run_s": None if r.run_s is None else round(r.run_s, 6),
                }
                for r in (*self._residents.values(), *self._transients)
            ]
