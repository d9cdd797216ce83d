"""One malloc arena for processes that run models on threads (glibc only).

glibc gives each thread its own arena; arenas other than the main one grow in 64 MB heaps and
cannot hold the larger buffers a model allocates and frees at every layer, so on a worker
thread those come from mmap each time and every page is faulted in and zeroed again. Measured
on the tiny Ideogram 4 checkpoint: a generation on a thread ran ~4-5% slower than on the main
thread; with one arena it runs as fast (bench/overhead.py). An explicit ``MALLOC_ARENA_MAX``
in the environment is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

log = logging.getLogger("kiapi.malloc")

M_ARENA_MAX = -8  # from glibc's malloc.h

_done = False


def use_one_arena() -> None:
    """Make threads started from now on share the main arena; best effort, once."""
    global _done
    if _done or not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    _done = True
    import ctypes  # here: the API process never needs it, and it is ~5% of a cold start

    try:
        libc = ctypes.CDLL(None)
        if not libc.mallopt(M_ARENA_MAX, 1):
            log.debug("mallopt(M_ARENA_MAX) refused")
    except (OSError, AttributeError):  # not glibc (musl has no mallopt/arenas)
        log.debug("no mallopt here")


def give_back_free_memory() -> None:
    """Return free heap pages to the system (glibc ``malloc_trim``); best effort.

    After a model is freed glibc may keep its pages, and the process's resident set (which the
    memory budget and KIAPI_WORKER_MAX_RSS_MB read) would not show the unload.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)
