"""Keep the control plane ahead of model work on a busy CPU.

Model threads (and the BLAS/MLX threads they start, which inherit their priority on Linux)
run at a higher nice value, so the scheduler serves the event loop first: status, files and
OpenAPI stay quick while a generation saturates every core.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("kiapi.priority")


def lower_thread_priority(nice: int) -> None:
    """Renice the calling thread only (Linux/macOS thread ids); best effort."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except OSError as exc:  # not permitted in some sandboxes; speed matters less than running
        log.debug("could not lower the priority of %s: %s", threading.current_thread().name, exc)
