"""A full disk, on a real (small) filesystem: a tmpfs the test mounts, so it needs root (CI
runs as root). kiapi answers 507, frees space on request, records every job's end once it can,
and leaves nothing behind. Also: what a fresh KIAPI_HOME is created with (modes).
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kiapi_core.testing import LiveServer, start_server, wait_for

ECHO = "/v1/text/echo/run"
ENV = {"KIAPI_PLUGINS": "echo", "KIAPI_WORKERS": "1", "KIAPI_SWEEP_INTERVAL_S": "1"}


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount(name, size): a fresh tmpfs of ``size`` under tmp_path; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "8m") -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CI runs these as root)")
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def servers() -> Iterator[list[LiveServer]]:
    """Servers a test starts; stopped before its tmpfs is unmounted (fixture order)."""
    started: list[LiveServer] = []
    yield started
    for server in started:
        server.stop()


def serve(servers: list[LiveServer], logs: Path, home: Path, **env: str) -> LiveServer:
    # The log stays off the small filesystem: the server must be heard while it is full.
    server = start_server(logs, {**ENV, "KIAPI_HOME": str(home), **env})
    servers.append(server)
    return server


def fill(fs: Path) -> Path:
    """Fill ``fs`` to the last byte with one file."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            block = b"\0" * size
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


def temp_files(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "files" / "tmp").iterdir())


def job(c: Any, job_id: str) -> dict[str, Any]:
    r = c.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def assert_disk_full_answer(r: Any, fs: Path) -> None:
    assert r.status_code == 507, r.text
    detail = r.json()["detail"]
    assert "disk is full" in detail, detail
    assert str(fs) not in r.text  # no server path


def test_full_disk_without_reserve(
    tmpfs: Callable[..., Path], servers: list[LiveServer], tmp_path: Path
) -> None:
    """The hard case: nothing set aside. Requests get 507, a file can still be deleted (its
    own space makes the room), and the job whose end could not be written ends failed,
    "disk full", as soon as there is space."""
    fs = tmpfs("fs")
    home = fs / "home"
    server = serve(servers, tmp_path / "logs", home, KIAPI_DISK_RESERVE_BYTES="0")
    with server.client(timeout=30) as c:
        assert c.post(ECHO, json={"text": "warm"}).status_code == 200
        keep = c.post("/v1/files", files={"file": ("big.bin", os.urandom(512 * 1024))})
        assert keep.status_code == 201, keep.text
        keep_id = keep.json()["id"]
        r = c.post(ECHO, json={"text": "long", "steps": 20, "delay_s": 0.1, "mode": "async"})
        job_id = r.json()["job_id"]
        wait_for(lambda: job(c, job_id)["status"] == "running")
        filler = fill(fs)
        assert_disk_full_answer(c.post(ECHO, json={"text": "more", "mode": "async"}), fs)
        up = c.post("/v1/files", files={"file": ("up.bin", os.urandom(300 * 1024))})
        assert_disk_full_answer(up, fs)
        assert temp_files(home) == []
        # The handler meets the full disk (its progress, then its file) and its end cannot
        # be recorded either: the worker keeps trying instead of leaving it "running".
        wait_for(lambda: f"job {job_id} (echo) failed: the disk is full" in server.output())
        assert job(c, job_id)["status"] in ("running", "failed")

        free = shutil.disk_usage(fs).free
        gone = c.delete(f"/v1/files/{keep_id}")
        assert gone.status_code == 200, gone.text
        assert c.get(f"/v1/files/{keep_id}").status_code == 404
        assert not (home / "files" / "blobs" / keep_id).exists()
        assert shutil.disk_usage(fs).free > free + 256 * 1024

        filler.unlink()
        done = wait_for(lambda: (j := job(c, job_id))["status"] != "running" and j, timeout=60)
        assert done["status"] == "failed" and "disk full" in done["error"], done
        assert done["artifacts"] == []

        after = c.post(ECHO, json={"text": "room again"})
        assert after.status_code == 200 and after.text == "room again"
        assert c.post("/v1/files", files={"file": ("up.bin", b"data")}).status_code == 201
    assert temp_files(home) == []
    assert "unhandled error" not in server.output()


def test_full_disk_with_the_reserve(
    tmpfs: Callable[..., Path], servers: list[LiveServer], tmp_path: Path
) -> None:
    """By default a reserve is set aside: the job's end is recorded while the disk is still
    full, a sync client gets its answer at once (not a 504 after KIAPI_SYNC_TIMEOUT_S), and
    the reserve is back once there is room."""
    fs = tmpfs("fs")
    home = fs / "home"
    server = serve(servers, tmp_path / "logs", home)
    reserve = home / "kiapi.db.reserve"
    assert reserve.stat().st_size == 1024**2
    with server.client(timeout=30) as c:
        assert c.post(ECHO, json={"text": "warm"}).status_code == 200
        r = c.post(ECHO, json={"text": "long", "steps": 20, "delay_s": 0.1, "mode": "async"})
        job_id = r.json()["job_id"]
        wait_for(lambda: job(c, job_id)["status"] == "running")
        filler = fill(fs)
        done = wait_for(lambda: (j := job(c, job_id))["status"] != "running" and j, timeout=30)
        assert done["status"] == "failed" and "disk full" in done["error"], done
        assert not reserve.exists()  # spent on recording that end
        assert temp_files(home) == []

        filler.unlink()
        wait_for(lambda: reserve.exists() and reserve.stat().st_size == 1024**2, timeout=30)
        # Full again, the reserve untouched by requests: a sync request is refused at once.
        filler = fill(fs)
        assert_disk_full_answer(c.post(ECHO, json={"text": "no room", "steps": 2}), fs)
        assert reserve.stat().st_size == 1024**2
        filler.unlink()
    assert temp_files(home) == []
    assert "unhandled error" not in server.output()


def test_uploads_are_spooled_under_kiapi_home_only(
    tmpfs: Callable[..., Path], servers: list[LiveServer], tmp_path: Path
) -> None:
    """A 5 MB upload fits an 8 MB disk: it is written once, straight into KIAPI_HOME (a copy
    spooled to TMPDIR first would need twice the space; here TMPDIR is on that disk too)."""
    fs = tmpfs("fs")
    home = fs / "home"
    spool = fs / "tmp"
    spool.mkdir()
    server = serve(servers, tmp_path / "logs", home, TMPDIR=str(spool))
    data = os.urandom(5 * 1024 * 1024)
    with server.client(timeout=60) as c:
        r = c.post("/v1/files", files={"file": ("five.bin", data)})
        assert r.status_code == 201, r.text
        assert c.get(f"/v1/files/{r.json()['id']}/download").content == data
    assert temp_files(home) == []
    assert "unhandled error" not in server.output()


def test_a_fresh_home_is_private(servers: list[LiveServer], tmp_path: Path) -> None:
    home = tmp_path / "fresh" / "home"
    server = serve(servers, tmp_path / "logs", home)
    with server.client() as c:
        assert c.post(ECHO, json={"text": "make the WAL"}).status_code == 200
        assert c.post("/v1/files", files={"file": ("a.bin", b"a")}).status_code == 201
        # The server holds the database open: its WAL and SHM exist now.
        for name in ("kiapi.db", "kiapi.db-wal", "kiapi.db-shm", "kiapi.lock", "kiapi.db.reserve"):
            mode = stat.S_IMODE((home / name).stat().st_mode)
            assert mode == 0o600, (name, oct(mode))
        for sub in ("", "files", "files/blobs", "files/tmp"):
            mode = stat.S_IMODE((home / sub).stat().st_mode)
            assert mode == 0o700, (sub or "home", oct(mode))
    # Another connection (a CLI, a backup script) still reads it.
    conn = sqlite3.connect(home / "kiapi.db")
    try:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    finally:
        conn.close()
