"""The worker process itself (``python -m kiapi_core.runtime.child``): the other end of the
pipes ``kiapi_core.runtime.process.ProcessPool`` starts it with.

It reads the settings, loads the plugins, then runs queued jobs with the same ``WorkerPool`` a
thread-mode server uses, telling the server about each change (see ``runtime/process.py`` for
the protocol). It dies with the server (PR_SET_PDEATHSIG, and EOF on its command pipe).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from typing import IO, Any

from kiapi_core.jobs.events import JobEvents
from kiapi_core.jobs.previews import Preview
from kiapi_core.plugin_refs import PluginRef, resolve
from kiapi_core.runtime import collector
from kiapi_core.runtime.malloc import give_back_free_memory
from kiapi_core.runtime.process import preview_message, worker_prefix
from kiapi_core.runtime.rss import rss_bytes
from kiapi_core.settings import Settings

log = logging.getLogger("kiapi.worker")


class PipeEvents(JobEvents):
    """JobEvents for the worker process: every change goes to the server over the pipe."""

    def __init__(self, out: IO[bytes]) -> None:
        super().__init__()
        self._out = out
        self._out_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\n"
        with self._out_lock:
            try:
                self._out.write(data)
                self._out.flush()
            except (OSError, ValueError):
                pass  # the server is gone; this process is about to be stopped

    def publish(self, job_id: str) -> None:
        # Only the id: the server's followers read the job from the store and its journal.
        self.send({"op": "job", "id": job_id})

    def publish_queue_moved(self) -> None:
        self.send({"op": "queue"})


class PipePreviews:
    """Live previews go to the server, which keeps them (and tells followers)."""

    def __init__(self, events: PipeEvents) -> None:
        self._events = events

    def put(self, preview: Preview) -> None:
        self._events.send(preview_message(preview))

    def drop(self, job_id: str) -> None:
        self._events.send({"op": "preview_drop", "id": job_id})


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the server died before prctl took effect
        os._exit(1)


def child_main(argv: list[str]) -> None:
    from kiapi_core.models.manager import ModelManager
    from kiapi_core.node import build_backend
    from kiapi_core.plugins import build_registry
    from kiapi_core.runtime.priority import lower_thread_priority
    from kiapi_core.runtime.threads import WorkerPool

    commands_fd, events_fd, parent = (int(a) for a in argv[:3])
    _die_with_parent(parent)
    # The server decides when this process ends ("stop", or end-of-file when it dies): Ctrl-C
    # in the terminal or a SIGTERM sent to the whole service must not end a job before the
    # server asks for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for fd in (commands_fd, events_fd):
        os.set_inheritable(fd, False)  # a program a plugin runs must not hold our pipes
    commands = os.fdopen(commands_fd, "rb")
    first = json.loads(commands.readline() or b"{}")
    if first.get("op") != "settings":
        sys.exit("kiapi worker process: no settings from the server")
    settings = Settings(**first["settings"])
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s",
    )
    # The server has already said which plugins loaded; repeat only what went wrong.
    logging.getLogger("kiapi.plugins").setLevel(logging.WARNING)
    # Before any thread starts: every thread this process makes (BLAS, MLX) inherits it.
    lower_thread_priority(settings.worker_nice, idle=settings.worker_sched_idle)
    events = PipeEvents(os.fdopen(events_fd, "wb"))
    in_code = [PluginRef(*ref) for ref in first.get("plugins", [])]
    registry = build_registry(settings, extra=[(ref.name, resolve(ref)) for ref in in_code])
    backend = build_backend(settings)
    models_lock = threading.Lock()

    def send_models() -> None:
        # Read and sent under one lock: two slots' snapshots never reach the server reordered.
        with models_lock:
            events.send({"op": "models", "state": models.export()})

    models = ModelManager(
        settings.memory_limit_gb,
        settings.model_idle_ttl_s,
        backend.weights,
        on_change=send_models,
        catalog=registry.models,
    )

    done = threading.Event()

    def exit_when_idle() -> None:
        # Models unloaded by the idle TTL and no job for as long: give all memory back (the
        # imported model libraries too). The server starts a new worker for the next job.
        ttl = settings.model_idle_ttl_s
        summary = models.summary()
        nothing_loaded = not summary["resident"] and not summary["transient"]
        if ttl > 0 and nothing_loaded and not done.is_set() and pool.stop_if_idle(ttl):
            log.info("idle for %.0fs with no model loaded; exiting", pool.idle_for())
            events.send({"op": "idle_exit"})
            done.set()

    def recycle_if_bloated() -> bool:
        # Between jobs (no job runs): memory a handler leaked or an allocator kept goes back
        # to the system with the process; the server starts a fresh one for the next job.
        ceiling = settings.worker_max_rss_mb
        rss = rss_bytes()
        if ceiling > 0 and rss is not None and rss > ceiling * 1024**2:
            give_back_free_memory()  # what malloc keeps for the next job does not count
            rss = rss_bytes()
        if ceiling <= 0 or rss is None or rss <= ceiling * 1024**2 or done.is_set():
            return False
        if not pool.stop_if_idle(0):
            return False  # another slot is running a job: checked again after it
        reason = (
            f"its resident memory {rss / 1024**2:.0f} MB was past"
            f" KIAPI_WORKER_MAX_RSS_MB={ceiling:g} after a job"
        )
        log.warning("exiting: %s", reason)
        events.send({"op": "recycle", "reason": reason})
        done.set()
        return True

    def maintain() -> None:
        if not recycle_if_bloated():
            exit_when_idle()

    pool = WorkerPool(
        store=backend.store,
        files=backend.files,
        models=models,
        settings=settings,
        handlers=registry.handlers,
        plugin_of=registry.plugin_of_job_type(),
        events=events,
        maintenance=maintain,
        name_prefix=worker_prefix(os.getpid()),
        renice=False,
        abandon_canceled=False,
        previews=PipePreviews(events),
    )
    collector.settle()  # as the server does
    pool.start()
    events.send({"op": "ready", "pid": os.getpid(), "types": sorted(registry.handlers)})
    stop_timeout = [4.0]

    def read_commands() -> None:
        for line in commands:
            message = json.loads(line)
            if message.get("op") == "wake":
                pool.wake()
            elif message.get("op") == "unload":
                models.unload(str(message.get("model")))
            elif message.get("op") == "stop":
                stop_timeout[0] = float(message.get("timeout", stop_timeout[0]))
                break
        done.set()  # "stop", or EOF: the server is going away

    threading.Thread(target=read_commands, name="kiapi-worker-commands", daemon=True).start()
    done.wait()
    pool.stop(timeout=stop_timeout[0])
    models.unload_all()
    logging.shutdown()
    os._exit(0)  # a handler thread still running must not keep the process alive


if __name__ == "__main__":
    child_main(sys.argv[1:])
