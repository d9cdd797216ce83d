"""The cyclic garbage collector in kiapi's long-running processes (server, workers)."""

from __future__ import annotations

import gc

# Allocations between two young collections (CPython's default: 700). Nearly everything a
# request or a job allocates is freed by reference counting; the collector only finds cycles,
# yet at the default it ran a full collection every few seconds under SSE fan-out, pausing an
# API node for 30-80 ms with 1,000 streams open (bench/scaleout.py).
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Once start-up is done: what it built (modules, schemas, routes, plugins) lives as long
    as the process, so it is frozen out of every collection's scan; and collections run ~14x
    less often, their generations' ratios unchanged."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
