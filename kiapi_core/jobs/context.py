"""What a job handler receives: its params, progress reporting, cancellation, files, models."""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from kiapi_core.files.schemas import FileInfo
from kiapi_core.ids import is_file_id
from kiapi_core.jobs.errors import JobInputError
from kiapi_core.jobs.previews import PreviewGate, PreviewSink, build_preview

if TYPE_CHECKING:
    from kiapi_core.files.store import FileStore
    from kiapi_core.models.manager import ModelManager
    from kiapi_core.settings import Settings

# Until the host itself marks a job done, reported progress stays below 1.0: a job is not
# finished until its result is saved, whatever the handler believes.
MAX_HANDLER_PROGRESS = 0.99


def artifact_file_id(job_id: str, attempt: int, index: int) -> str:
    """The id of a job's ``index``-th artifact in run ``attempt``: derived, not drawn.

    Keyed by the job, so its files are found and replaced by id; distinct per attempt, so a
    worker that lost its claim (and deletes what it wrote) never touches the files of the run
    that took the job over.
    """
    digest = hashlib.sha256(f"{job_id}/{attempt}/{index}".encode()).hexdigest()
    return f"file_{digest[:16]}"


class JobCanceled(Exception):
    """Raised inside a handler (by ``ctx.progress``/``ctx.check_canceled``) to stop the job."""


class JobTimedOut(JobCanceled):
    """The job ran past KIAPI_JOB_TIMEOUT_S."""


class JobDeadlinePassed(JobCanceled):
    """The job's own deadline (Cancel-After) passed while it ran: it ends canceled."""


class JobInterrupted(JobCanceled):
    """The server is shutting down: the job stops at its next report and ends failed."""


@dataclass
class JobContext:
    """What a job handler gets: ``params`` (the job's JSON params), ``progress(fraction,
    label, eta_s=)`` (which raises ``JobCanceled`` once the job is canceled or out of time),
    ``check_canceled()``, ``save_file(data, filename=, content_type=)`` for artifacts,
    ``models.use(spec)`` (a context manager lending the loaded model), ``settings`` and ``log``;
    ``wants_preview(step)`` / ``publish_preview(image, step=, steps=)`` for live previews.
    """

    job_id: str
    type: str
    params: dict[str, Any]
    files: FileStore
    models: ModelManager
    settings: Settings
    # (job id, fraction, label, Unix time the job is expected to end or None)
    report: Callable[[str, float | None, str | None, float | None], None]
    is_canceled: Callable[[str], bool]
    deadline: float | None = None
    # Unix time of the job's own deadline (Cancel-After), unlike ``deadline`` (the timeout).
    cancel_at: float | None = None
    is_stopping: Callable[[], bool] = lambda: False
    attempt: int = 1
    plugin: str = ""  # the plugin whose handler runs (names its data directory)
    artifacts: list[str] = field(default_factory=list)
    # Recent run time of this job type (the host's ETA before the handler gives its own).
    typical_s: float | None = None
    previews: PreviewSink | None = None  # where published previews go; None: nowhere
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("kiapi.jobs"))
    _last_progress: float = 0.0
    _began: float = field(default_factory=time.monotonic, repr=False)
    _eta_declared: bool = False
    _first_progress: tuple[float, float] | None = None
    # Progress may come from helper threads of the handler too (a ticker during a long phase).
    _progress_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _preview_gate: PreviewGate | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        """This plugin's own directory under the server's home (``$KIAPI_HOME/plugins/NAME``),
        created on first use: for what it learns or caches across jobs and restarts."""
        path = Path(self.settings.home) / "plugins" / (self.plugin or self.type)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def file_info(self, file_id: str) -> FileInfo:
        """An input file's metadata (one uploaded with ``POST /v1/files``), by id; a job whose
        params name a file that does not exist fails as invalid input (400)."""
        info = self.files.get(file_id) if is_file_id(file_id) else None
        if info is None:
            raise JobInputError(f"no file {file_id[:64]!r}; upload it first with POST /v1/files")
        return info

    def open_file(self, file_id: str) -> IO[bytes]:
        """An input file's bytes, opened for reading (close it, e.g. ``with ctx.open_file(...)``)."""
        return self.files.blob_path(self.file_info(file_id)).open("rb")

    def report_progress(
        self, fraction: float | None = None, label: str | None = None, *, eta_s: float | None = None
    ) -> bool:
        """``progress`` for helper threads: never raises for a cancel; returns False once the
        job should stop (canceled, past its deadline, server stopping), True otherwise. The
        handler's own thread still learns of a cancel at its next ``progress`` call."""
        try:
            self.check_canceled()
        except JobCanceled:
            return False
        try:
            self._record(fraction, label, eta_s)
        except (TypeError, ValueError):
            raise  # a bad report is the caller's bug: say so
        except Exception:
            # A store that refused one report (busy, full disk) must not kill a helper thread.
            self.log.exception("job %s: a progress report failed", self.job_id)
        return True

    def check_canceled(self) -> None:
        """Raise JobCanceled if someone asked to cancel this job (or it ran out of time)."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise JobTimedOut(f"job exceeded KIAPI_JOB_TIMEOUT_S={self.settings.job_timeout_s:g}")
        if self.cancel_at is not None and time.time() >= self.cancel_at:
            raise JobDeadlinePassed("the job's deadline (Cancel-After) passed while it was running")
        if self.is_stopping():
            raise JobInterrupted("interrupted by server shutdown")
        if self.is_canceled(self.job_id):
            raise JobCanceled("canceled by request")

    def progress(
        self, fraction: float | None = None, label: str | None = None, *, eta_s: float | None = None
    ) -> None:
        """Report progress (0..1, never backwards) and a phase label; raises if canceled.

        ``eta_s``: the handler's own estimate of the seconds left (the job's ``eta_s``). Once
        a handler gave one, the last it gave stands, counting down, until it gives another;
        until then the host estimates from recent run times of the job type and the progress
        rate. Safe from any thread: reports from several threads never move the fraction back."""
        self.check_canceled()
        self._record(fraction, label, eta_s)

    def _eta_at(self, fraction: float | None, eta_s: float | None) -> float | None:
        """When the job is expected to end (Unix time), or None to leave the stored one."""
        if eta_s is not None:
            self._eta_declared = True
            return time.time() + eta_s
        if self._eta_declared:
            return None
        elapsed = time.monotonic() - self._began
        fraction = self._last_progress if fraction is None else fraction
        if self._first_progress is None and fraction > 0:
            self._first_progress = (elapsed, fraction)
        left = host_eta_s(elapsed, fraction, self.typical_s, self._first_progress)
        return None if left is None else time.time() + left

    def _record(self, fraction: float | None, label: str | None, eta_s: float | None) -> None:
        # Refused here, in the handler's own call, so the job fails naming the bad report
        # instead of storing a value no answer could show (NaN, or a label that is no string).
        if label is not None and not isinstance(label, str):
            raise TypeError(f"progress label must be a string, got {type(label).__name__}")
        if eta_s is not None:
            eta_s = float(eta_s)
            if not math.isfinite(eta_s) or eta_s < 0:
                raise ValueError(f"eta_s must be a finite number of seconds >= 0, got {eta_s}")
        if fraction is not None:
            fraction = float(fraction)
            if not math.isfinite(fraction):
                raise ValueError(
                    f"progress fraction must be a finite number in [0, 1], got {fraction}"
                )
        with self._progress_lock:
            if fraction is not None:
                fraction = min(max(fraction, self._last_progress), MAX_HANDLER_PROGRESS)
                self._last_progress = fraction
            eta_at = self._eta_at(fraction, eta_s)
            # Under the lock too: two threads' reports reach the store in the order decided.
            self.report(self.job_id, fraction, label, eta_at)

    def _gate(self) -> PreviewGate:
        if self._preview_gate is None:
            s = self.settings
            # Off per server (KIAPI_PREVIEWS) or per request (a param "preview": false).
            on = (
                self.previews is not None and s.previews and self.params.get("preview") is not False
            )
            self._preview_gate = PreviewGate(on, s.preview_every, s.preview_min_interval_s)
        return self._preview_gate

    def wants_preview(self, step: int) -> bool:
        """Whether a preview of step ``step`` would be published now: previews on for this
        server and job, ``step`` a multiple of KIAPI_PREVIEW_EVERY, and
        KIAPI_PREVIEW_MIN_INTERVAL_S passed since the last one. Cheap: ask before making one."""
        return self._gate().wants(step)

    def publish_preview(self, image: Any, *, step: int, steps: int) -> bool:
        """Show ``image`` (a PIL image, or encoded image bytes) as this job's live preview at
        ``step`` of ``steps``; True when published, False when ``wants_preview`` says no.

        The host downsizes it (longest side <= 256 px), encodes it (JPEG; WebP or JPEG bytes
        already that small are kept), keeps only the latest, and drops it when the job ends:
        never an artifact. A failure to store it is logged, never raised: a preview is a hint.
        """
        if not isinstance(step, int) or not isinstance(steps, int) or not 0 <= step <= steps:
            raise ValueError(
                f"publish_preview: need integers 0 <= step <= steps, got {step}/{steps}"
            )
        gate = self._gate()
        if self.previews is None or not gate.wants(step):
            return False
        preview = build_preview(self.job_id, image, step, steps)
        gate.published()
        try:
            self.previews.put(preview)
        except Exception:
            self.log.exception("job %s: a preview could not be stored", self.job_id)
            return False
        return True

    def save_file(self, data: bytes, *, filename: str, content_type: str) -> FileInfo:
        """Store an artifact of this job; removed again if the job fails or is canceled."""
        info = self.files.put_bytes(
            data,
            filename=filename,
            content_type=content_type,
            job_id=self.job_id,
            file_id=artifact_file_id(self.job_id, self.attempt, len(self.artifacts)),
        )
        self.artifacts.append(info.id)
        return info


# By this fraction the host's ETA rests on the progress rate alone, no longer on history.
HISTORY_HANDOVER = 0.2


def host_eta_s(
    elapsed_s: float,
    fraction: float,
    typical_s: float | None,
    first: tuple[float, float] | None = None,
) -> float | None:
    """The host's estimate of a job's seconds left, for handlers that give none: the recent
    run time of its type, handing over to the progress rate by HISTORY_HANDOVER.

    ``first``: (elapsed seconds, fraction) at the first report above 0; the rate is measured
    from there, so a warm-up before any progress (a model load) does not count against it.
    """
    by_rate = None
    if first is not None and fraction > first[1] and elapsed_s > first[0]:
        by_rate = (elapsed_s - first[0]) / (fraction - first[1]) * (1.0 - fraction)
    elif fraction > 0:
        by_rate = elapsed_s * (1.0 - fraction) / fraction
    by_history = max(typical_s - elapsed_s, 0.0) if typical_s is not None else None
    if by_rate is None or by_history is None:
        return by_rate if by_history is None else by_history
    weight = min(fraction / HISTORY_HANDOVER, 1.0)
    return (1.0 - weight) * by_history + weight * by_rate


JobHandler = Callable[[JobContext], dict[str, Any]]
