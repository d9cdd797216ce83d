"""One server per KIAPI_HOME: an exclusive ``flock`` on ``$KIAPI_HOME/kiapi.lock``.

A second server on the same home would take the first one's running jobs for leftovers of a
crash (start-up recovery fails them) and delete its uploads in progress. The lock is held for
the life of the process and goes with it, however it ends (the kernel drops it with the last
descriptor; a stale file is harmless). The file holds the owner's pid, for the message. Only
the embedded backend takes it: ``kiapi worker`` nodes share a files directory, not a home.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

LOCK_NAME = "kiapi.lock"


class HomeLocked(RuntimeError):
    def __init__(self, home: Path, holder: int | None) -> None:
        who = f"pid {holder}" if holder is not None else "a process whose pid it did not record"
        super().__init__(
            f"KIAPI_HOME {home} is in use by another kiapi server ({who}); stop it, or give this"
            " one its own KIAPI_HOME"
        )
        self.home = home
        self.holder = holder


_guard = threading.Lock()
# Lock file -> [descriptor, users in this process]: create_app's lifespan takes the lock that
# `kiapi serve` already holds, and only the last release lets it go.
_held: dict[Path, list[int]] = {}


def lock_home(home: Path) -> Path:
    """Take the home's lock (re-entrant within this process) or raise ``HomeLocked``."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = (home / LOCK_NAME).resolve()
    with _guard:
        if path in _held:
            _held[path][1] += 1
            return path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise HomeLocked(home, holder) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[path] = [fd, 1]
        return path


def unlock_home(path: Path) -> None:
    with _guard:
        entry = _held.get(path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[path]
            os.ftruncate(entry[0], 0)
            os.close(entry[0])


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
