"""malloc for processes that run models: one arena, freed buffers kept (glibc only).

A model on the CPU (MLX's CPU allocator is plain malloc) allocates and frees buffers of many
megabytes at every layer. glibc serves those from mmap and unmaps them on free, so every page
is faulted in and zeroed again at the next step: on the tiny Ideogram 4 checkpoint a 256x256
generation took 1.35 million page faults (about 5 GB zeroed) and how many depended on how the
process's heap happened to grow, which made the same generation 3-6% faster or slower from one
process to the next (bench/overhead.py). Two settings end that:

- one arena: glibc gives each thread its own, and arenas other than the main one grow in
  64 MB heaps that cannot hold such buffers (a generation on a thread ran ~4-5% slower);
- no mmap for allocations and no automatic trimming of the heap's top: freed buffers stay in
  the heap for the next step. Measured side by side: 0 faults per generation instead of
  1.35 million, the generation 16-18% faster than in a default process.

The memory kept that way is returned whenever it matters: when a model is unloaded, before the
memory budget reads the resident set to admit a load, and before a worker compares it with
KIAPI_WORKER_MAX_RSS_MB (``give_back_free_memory``, glibc's ``malloc_trim``, which also frees
unused pages inside the heap). Explicit malloc settings in the environment (``MALLOC_ARENA_MAX``,
``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_`` or ``glibc.malloc`` tunables) are left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Mapping

log = logging.getLogger("kiapi.malloc")

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

_done = False


def _wanted(environ: Mapping[str, str]) -> dict[int, int]:
    """The mallopt settings to make: those the environment does not set already."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    wanted: dict[int, int] = {}
    if "MALLOC_ARENA_MAX" not in environ and "glibc.malloc.arena_max" not in tunables:
        wanted[M_ARENA_MAX] = 1
    if not any(k in environ for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")) and not any(
        t in tunables for t in ("glibc.malloc.mmap_max", "glibc.malloc.trim_threshold")
    ):
        wanted[M_MMAP_MAX] = 0
        wanted[M_TRIM_THRESHOLD] = 2**31 - 1  # mallopt takes an int
    return wanted


def tune_for_models() -> None:
    """One arena for every thread started from now on, freed buffers kept; best effort, once."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return
    _done = True
    wanted = _wanted(os.environ)
    if not wanted:
        return
    import ctypes  # here: the API process never needs it, and it is ~5% of a cold start

    try:
        libc = ctypes.CDLL(None)
        for option, value in wanted.items():
            if not libc.mallopt(option, value):
                log.debug("mallopt(%d, %d) refused", option, value)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt/arenas)
        log.debug("no mallopt here")


def give_back_free_memory() -> None:
    """Return free heap pages to the system (glibc ``malloc_trim``); best effort.

    glibc keeps freed memory (all of it after ``tune_for_models``), and the process's resident
    set, which the memory budget and KIAPI_WORKER_MAX_RSS_MB read, would count it.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)
