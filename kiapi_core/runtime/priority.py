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


def lower_thread_priority(nice: int, *, idle: bool = False) -> None:
    """Renice the calling thread only (Linux/macOS thread ids); best effort.

    ``idle``: also move it to SCHED_IDLE (Linux), where it runs only on CPU time no other
    thread wants: a request waking up the event loop takes the core at once instead of
    sharing it (measured: fewer multi-millisecond stalls than nice 19 alone).
    """
    if idle and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            log.debug("could not use SCHED_IDLE: %s", exc)
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except OSError as exc:  # not permitted in some sandboxes; speed matters less than running
        log.debug("could not lower the priority of %s: %s", threading.current_thread().name, exc)
