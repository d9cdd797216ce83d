"""What a process really holds in RAM (its resident set), read from /proc on Linux.

Catalog estimates say what a model should take; the resident set is what the kernel (and its
OOM killer) sees, leaks and allocator caches included. The memory budget and the worker's
recycling compare against it.
"""

from __future__ import annotations

import os

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pid: int | None = None) -> int | None:
    """Resident bytes of ``pid`` (default: this process); None where it cannot be read."""
    try:
        with open(f"/proc/{pid or 'self'}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def rss_mb(pid: int | None = None) -> float | None:
    rss = rss_bytes(pid)
    return round(rss / 1024**2, 1) if rss is not None else None
