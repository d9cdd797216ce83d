"""Jobs in a worker process: the embedded default (KIAPI_WORKER_MODE=process).

The server starts one child process (``python -m kiapi_core.runtime.child``, its own module) when the first job
is queued. The child loads the same plugins, claims jobs from the same SQLite store and runs
them with the same ``WorkerPool`` a thread-mode server uses; models live in it. So model code
never holds the server's GIL (status calls stay quick mid-generation), and a crash in native
model code (a segfault, the OOM killer) fails the job it was running and restarts the worker
instead of taking the API down.

The two talk over a pair of pipes, one JSON object per line:

- server -> child: the settings first, then ``wake`` (a job was queued), ``unload`` (a model,
  unless a job uses it: ``DELETE /v1/models/{id}/resident``) and ``stop``;
- child -> server: ``job`` (a job changed; with the job as it was right after), ``queue`` (the
  queue moved), ``models`` (what is resident, for /health and /v1/models), ``idle_exit`` and
  ``recycle`` (it is exiting: idle, or past KIAPI_WORKER_MAX_RSS_MB), ``preview`` (a job's
  latest live preview, its few kilobytes in base64: kept in the server's memory only) and
  ``preview_drop`` (its job ended).

A handler that ignores its cancel for KIAPI_CANCEL_GRACE_S cannot be stopped from inside the
process (threads cannot be killed): the server ends that job ``canceled`` and restarts the
worker.

The store stays the source of truth: these messages only wake followers and mirror state.
The child dies with the server (PR_SET_PDEATHSIG, and EOF on its command pipe).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from kiapi_core.files.store import FileStore
from kiapi_core.jobs.events import JobEvents
from kiapi_core.jobs.previews import Preview, PreviewInfo, PreviewSink
from kiapi_core.jobs.store import JobRecord, JobStore
from kiapi_core.plugin_refs import PluginRef
from kiapi_core.runtime.rss import rss_mb
from kiapi_core.settings import Settings
from kiapi_core.state.diskfull import is_disk_full

log = logging.getLogger("kiapi.worker")

# Settings the child never needs; secrets stay in the server process (webhooks are sent by
# the server, never by the worker process).
PRIVATE_SETTINGS = frozenset({"api_key", "redis_url", "webhook_secret"})
WORKER_MODULE = "kiapi_core.runtime.child"
# A worker that keeps dying is restarted after a growing pause, up to this long.
MAX_RESTART_DELAY_S = 30.0
# How often the server looks for running jobs whose cancel went unheeded.
HUNG_CHECK_S = 1.0


class LineReader:
    """Splits a byte stream into lines in time linear in its length, however it is chunked.

    Re-joining and re-splitting what is pending at every chunk is quadratic in a line's length:
    a 60 MB job snapshot took the server 14-25 s of CPU and stalled the next job.
    """

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines ``chunk`` completes (without their newline; empty ones dropped)."""
        start = len(self._pending)
        self._pending += chunk
        # Only the new bytes can hold a newline not seen before.
        end = self._pending.rfind(b"\n", start)
        if end < 0:
            return []
        lines = bytes(self._pending[:end]).split(b"\n")
        del self._pending[: end + 1]
        return [line for line in lines if line]


class ModelMirror:
    """The API's view of the models resident in the worker process (a ``ModelsView``)."""

    def __init__(self, limit_gb: float) -> None:
        self._lock = threading.Lock()
        self._summary: dict[str, float] = {
            "resident": 0,
            "transient": 0,
            "memory_gb_used": 0.0,
            "memory_gb_limit": limit_gb,
        }
        self._status: list[dict[str, Any]] = []
        self._at = time.monotonic()
        self.load_counts: Counter[str] = Counter()
        self.transient_counts: Counter[str] = Counter()
        self._seen: dict[str, dict[str, int]] = {}
        # Set by the ProcessPool: how an unload request reaches the worker process.
        self.send: Callable[[dict[str, Any]], None] = lambda message: None

    def update(self, state: dict[str, Any]) -> None:
        with self._lock:
            self._summary = dict(state["summary"])
            self._status = list(state["status"])
            self._at = time.monotonic()
            # The worker counts from 0 after a restart; the API's counts go on adding up.
            for kind, counter in (
                ("load_counts", self.load_counts),
                ("transient_counts", self.transient_counts),
            ):
                seen = self._seen.get(kind, {})
                for key, n in state[kind].items():
                    counter[key] += n - seen.get(key, 0)
                self._seen[kind] = dict(state[kind])

    def worker_gone(self) -> None:
        """The worker exited: nothing is resident any more."""
        with self._lock:
            self._summary = {**self._summary, "resident": 0, "transient": 0, "memory_gb_used": 0.0}
            self._status = []
            self._seen = {}

    def summary(self) -> dict[str, float]:
        with self._lock:
            return dict(self._summary)

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            aged = time.monotonic() - self._at
            return [
                {**row, "idle_s": round(row["idle_s"] + aged, 3)} if not row["in_use"] else row
                for row in self._status
            ]

    def unload_all(self) -> None:
        """Models go with the worker process when it stops."""

    def request_unload(self, model: str) -> None:
        self.send({"op": "unload", "model": model})


class ProcessPool:
    """The server's side: starts, feeds, watches and restarts the worker process."""

    def __init__(
        self,
        *,
        store: JobStore,
        files: FileStore,
        settings: Settings,
        events: JobEvents,
        models: ModelMirror,
        in_code: list[PluginRef] | None = None,
        previews: PreviewSink | None = None,
    ) -> None:
        self.store = store
        self.previews = previews
        self.files = files
        self.settings = settings
        self.events = events
        self.models = models
        models.send = self._send
        self.in_code = list(in_code or [])
        self.restarts = 0
        # Planned exits (RSS ceiling, a hung canceled job), not counted as restarts.
        self.recycles = 0
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self._write_lock = threading.Lock()
        self._commands: int | None = None  # the command pipe's fd, while a worker runs
        self._proc: subprocess.Popen[bytes] | None = None
        self._supervisor: threading.Thread | None = None
        self._ready = False
        self._idle_exit = False
        self._recycle: str | None = None  # why the running worker is being replaced
        self._cancel_seen: dict[str, float] = {}
        self._spawn_lock = threading.Lock()
        self._stop_timeout = 4.0

    # -- Dispatcher ------------------------------------------------------------------------
    def start(self) -> None:
        self._supervisor = threading.Thread(
            target=self._supervise, name="kiapi-worker-supervisor", daemon=True
        )
        self._supervisor.start()
        if self._anything_queued():
            self._wanted.set()

    def dispatch(self, job: JobRecord) -> None:
        if self._commands is None:
            self._wanted.set()  # the worker claims every queued job once it is up
        else:
            self._send({"op": "wake"})

    def stop(self, timeout: float = 5.0) -> None:
        """Running jobs stop at their next progress report; after ``timeout`` the worker is
        killed and what it was running ends failed, "interrupted by server shutdown"."""
        with self._spawn_lock:  # no worker starts after this; one starting gets "stop" below
            self._stopping.set()
            self._stop_timeout = max(0.0, timeout - 1.0)
        self._wanted.set()
        # The worker gets a little less time than we wait, to end its jobs itself.
        self._send({"op": "stop", "timeout": self._stop_timeout})
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop within %.0fs; killing it", proc.pid, timeout)
                proc.kill()
        if self._supervisor is not None:
            self._supervisor.join(timeout + 5)

    def describe(self) -> dict[str, Any]:
        # pid is None until the first job starts the worker.
        return {
            "mode": "process",
            "slots": self.settings.workers,
            "pid": self.pid,
            "restarts": self.restarts,
            "recycles": self.recycles,
            "rss_mb": rss_mb(self.pid) if self.pid is not None else None,
        }

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    # -- supervision -----------------------------------------------------------------------
    def _send(self, message: dict[str, Any]) -> None:
        # Called on the event loop: the pipe is non-blocking, so a stuck worker can never
        # stall the API. A message under PIPE_BUF is written whole or not at all; a lost
        # "wake" only delays a job until the worker's next look at the queue (<= 5 s).
        data = json.dumps(message).encode() + b"\n"
        with self._write_lock:
            if self._commands is None:
                return
            # Full (BlockingIOError) or the worker is gone: the supervisor acts on the latter.
            with contextlib.suppress(OSError):
                os.write(self._commands, data)

    def _supervise(self) -> None:
        # Popen runs on this thread, which outlives the child: PR_SET_PDEATHSIG fires when
        # the *thread* that forked the child exits, not only the process.
        delay = 1.0
        while True:
            self._wanted.wait()
            if self._stopping.is_set():
                return
            started = time.monotonic()
            self._ready = self._idle_exit = False
            self._recycle = None
            self._cancel_seen.clear()
            try:
                rc, pid = self._run_once()
            except Exception:
                log.exception("starting the worker process failed")
                rc, pid = 1, None
            self.models.worker_gone()
            if not self._ready and rc > 0 and not self._stopping.is_set():
                # It could not start (an error, not a signal): queued jobs would wait forever.
                # Cleared first, so a job queued from here on starts a new attempt.
                self._wanted.clear()
                self._fail_queued(
                    f"the worker process could not start (exit code {rc}); see the server log"
                )
            if pid is not None:
                if self._stopping.is_set():
                    reason = "interrupted by server shutdown"
                elif self._recycle is not None:
                    reason = f"the worker process was restarted ({self._recycle})"
                else:
                    reason = f"the worker process exited (code {rc}) while running this job"
                self._fail_jobs_of(pid, reason)
            if self._stopping.is_set():
                return
            if self._recycle is not None:
                log.warning("worker process %s replaced: %s", pid, self._recycle)
                self.recycles += 1
            if (self._idle_exit and rc == 0) or self._recycle is not None:
                self._wanted.clear()
                if self._anything_queued():  # queued while it was on its way out
                    self._wanted.set()
                continue
            log.error("worker process exited with code %s; restarting it", rc)
            self.restarts += 1
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, MAX_RESTART_DELAY_S)
            self._stopping.wait(delay)

    def _anything_queued(self) -> bool:
        try:
            return self.store.waiting_count() > 0
        except Exception:
            # This thread must not die (the worker dies with it): assume there is work.
            log.exception("reading the queue failed")
            return True

    def _run_once(self) -> tuple[int, int | None]:
        with self._spawn_lock:
            if self._stopping.is_set():
                return 0, None  # stop() came first: no worker is started
            to_child_r, to_child_w = os.pipe()
            from_child_r, from_child_w = os.pipe()
            try:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        WORKER_MODULE,
                        str(to_child_r),
                        str(from_child_w),
                        str(os.getpid()),
                    ],
                    pass_fds=(to_child_r, from_child_w),
                    stdin=subprocess.DEVNULL,
                    # Not a session of its own: with autogroup scheduling (most Linux
                    # desktops and servers) a new session is a new CPU group that competes
                    # with the server's as an equal, whatever its nice value or policy.
                    # Ctrl-C reaches it too; it ignores that and waits for "stop".
                )
            except BaseException:
                os.close(to_child_w)
                os.close(from_child_r)
                raise
            finally:
                os.close(to_child_r)
                os.close(from_child_w)
            self._proc = proc
        settings = self.settings.model_dump(mode="json", exclude=set(PRIVATE_SETTINGS))
        # Blocking, and first: the one message that may exceed PIPE_BUF.
        with contextlib.suppress(OSError), os.fdopen(os.dup(to_child_w), "wb") as first:
            message = {
                "op": "settings",
                "settings": settings,
                "plugins": [ref.as_list() for ref in self.in_code],
            }
            first.write(json.dumps(message).encode() + b"\n")
        os.set_blocking(to_child_w, False)
        with self._write_lock:
            self._commands = to_child_w
        if self._stopping.is_set():  # stop() ran while it was starting: tell it now
            self._send({"op": "stop", "timeout": self._stop_timeout})
        log.info("worker process %d started", proc.pid)
        try:
            self._read(proc, from_child_r)
        finally:
            os.close(from_child_r)
            with self._write_lock:
                fd, self._commands = self._commands, None
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        return proc.wait(), proc.pid

    def _read(self, proc: subprocess.Popen[bytes], fd: int) -> None:
        """Handle the worker's messages until it exits.

        Not until end-of-file alone: a process the worker forked (a library's helper) may
        hold the pipe open after the worker died, and the server must still notice.
        """
        reader = LineReader()
        poller = select.poll()  # not select(): a busy server's fds go past FD_SETSIZE
        poller.register(fd, select.POLLIN)
        next_check = time.monotonic() + HUNG_CHECK_S
        while True:
            if poller.poll(1000):
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                for line in reader.feed(chunk):
                    self._handle(line)
            elif proc.poll() is not None:
                return
            if time.monotonic() >= next_check and self._recycle is None:
                next_check = time.monotonic() + HUNG_CHECK_S
                self._end_hung_cancels(proc)

    def _end_hung_cancels(self, proc: subprocess.Popen[bytes]) -> None:
        """Restart a worker running a job whose cancel it ignored for KIAPI_CANCEL_GRACE_S.

        The job ends ``canceled`` once the process is gone (so nothing it writes survives) and
        its files are deleted; jobs still queued run in the next worker.
        """
        grace = self.settings.cancel_grace_s
        prefix = worker_prefix(proc.pid)
        try:
            flagged = [
                j
                for j in self.store.running()
                if j.cancel_requested and (j.worker or "").startswith(prefix)
            ]
        except Exception:
            log.exception("reading the running jobs failed")
            return
        now = time.monotonic()
        self._cancel_seen = {j.id: self._cancel_seen.get(j.id, now) for j in flagged}
        hung = [j for j in flagged if now - self._cancel_seen[j.id] >= grace]
        if not hung:
            return
        ids = ", ".join(j.id for j in hung)
        self._recycle = f"job {ids} ignored its cancel for KIAPI_CANCEL_GRACE_S={grace:g}s"
        log.error("worker process %d: %s; killing it", proc.pid, self._recycle)
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        for job in hung:
            try:
                if self.store.finish(
                    job.id,
                    "canceled",
                    worker=job.worker,
                    error=f"canceled by request (the handler did not stop within"
                    f" KIAPI_CANCEL_GRACE_S={grace:g}s; its worker process was restarted)",
                    error_kind="canceled",
                ):
                    self.files.delete_for_job(job.id)
                self.events.publish(job.id)
            except Exception:
                log.exception("ending job %s failed", job.id)

    def _handle(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            op = message["op"]
            if op == "job":
                self.events.publish(message["id"])
            elif op == "queue":
                self.events.publish_queue_moved()
            elif op == "preview" and self.previews is not None:
                self.previews.put(preview_from_message(message))
            elif op == "preview_drop" and self.previews is not None:
                self.previews.drop(message["id"])
            elif op == "models":
                self.models.update(message["state"])
            elif op == "ready":
                self._ready = True
                log.info("worker process %s serving %s", message["pid"], message["types"])
            elif op == "idle_exit":
                self._idle_exit = True
            elif op == "recycle":
                self._recycle = message["reason"]
        except Exception:
            log.exception("bad message from the worker process: %r", line[:200])

    def _fail_jobs_of(self, pid: int, reason: str) -> None:
        """End the jobs a dead worker left running, and drop the files they had saved."""
        prefix = worker_prefix(pid)
        delay = 0.5
        while True:
            try:
                running = [j for j in self.store.running() if (j.worker or "").startswith(prefix)]
                break
            except Exception:
                # Nothing else owns these jobs: keep trying (a locked or full database).
                log.exception("reading the jobs of worker process %d failed; retrying", pid)
                if self._stopping.wait(delay):
                    return  # start-up recovery ends them
                delay = min(delay * 2, MAX_RESTART_DELAY_S)
        for job in running:
            try:  # one job's failure must not leave the others running
                if self._finish_when_room(job.id, job.worker, reason):
                    self.files.delete_for_job(job.id)
                    log.error("job %s: %s", job.id, reason)
                    self.events.publish(job.id)
            except Exception:
                log.exception("failing job %s of worker process %d failed", job.id, pid)

    def _finish_when_room(self, job_id: str, worker: str | None, reason: str) -> bool:
        """Fail a job of a dead worker, retried while the disk is full: it must not stay
        "running". Stopping, it is left to start-up recovery."""
        delay = 0.5
        while True:
            try:
                return self.store.finish(
                    job_id, "failed", worker=worker, error=reason, error_kind="interrupted"
                )
            except Exception as exc:
                if not is_disk_full(exc) or self._stopping.wait(delay):
                    raise
                log.warning("job %s: cannot record its end, the disk is full; retrying", job_id)
            delay = min(delay * 2, 10.0)

    def _fail_queued(self, reason: str) -> None:
        try:
            while (job := self.store.claim_next("kiapi-worker-unstarted")) is not None:
                self.store.finish(
                    job.id, "failed", worker=job.worker, error=reason, error_kind="internal"
                )
                log.error("job %s: %s", job.id, reason)
                self.events.publish(job.id)
            self.events.publish_queue_moved()
        except Exception:
            log.exception("failing the queued jobs failed")


def preview_message(preview: Preview) -> dict[str, Any]:
    """A live preview as one line of the worker's pipe (``preview_from_message`` reads it)."""
    info = preview.info
    return {
        "op": "preview",
        **info.event_data(),
        "etag": info.etag,
        "data": base64.b64encode(preview.data).decode("ascii"),
    }


def preview_from_message(message: dict[str, Any]) -> Preview:
    info = PreviewInfo(
        job_id=str(message["job_id"]),
        step=int(message["step"]),
        steps=int(message["steps"]),
        width=int(message["width"]),
        height=int(message["height"]),
        media_type=str(message["media_type"]),
        etag=str(message["etag"]),
    )
    return Preview(info, base64.b64decode(message["data"]))


def worker_prefix(pid: int) -> str:
    return f"kiapi-worker-p{pid}-"
