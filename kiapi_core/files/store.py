"""Blobs under ``KIAPI_FILES_DIR/blobs/<id>``, metadata behind the ``FileMeta`` seam.

Paths are only ever built from ids that passed the id pattern, never from user input. A blob
becomes visible by an atomic rename after fsync, and its record is written after the rename, so
a crash leaves at worst an orphan blob or temp file, which start-up removes.

Metadata lives in SQLite (``SqliteFileMeta``, the embedded default) or in Redis
(``kiapi_core.state.redis.RedisFileMeta``) when several nodes share one files
directory. Only ``FileStore`` touches the blobs, through ``open_temp``/``commit_temp``,
``blob_path`` and ``_unlink_blob``: an object-storage backend replaces those and keeps the rest.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import logging
import os
import re
import socket
import sqlite3
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Protocol, runtime_checkable
from urllib.parse import quote

from kiapi_core.files.schemas import FileInfo
from kiapi_core.ids import is_file_id, new_file_id
from kiapi_core.state.diskfull import is_disk_full
from kiapi_core.state.sqlite import Database

log = logging.getLogger("kiapi.files")

# Letters and digits of any script, and . _ - space; everything else becomes "_".
_UNSAFE_NAME = re.compile(r"[^\w. -]+")
# RFC 9110 media-type, ASCII only: it is sent back as a Content-Type header, so no CR/LF.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[\t !#-\[\]-~]|\\[\t -~])*"'
_MEDIA_TYPE = re.compile(
    rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*(?:{_TOKEN}=(?:{_TOKEN}|{_QUOTED}))?)*", re.ASCII
)
MAX_CONTENT_TYPE = 255
# A temp file's name starts with its writer, "<host>.<pid>.": start-up cleanup leaves the
# temp files of live processes alone (an upload another process is receiving right now).
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


class FileTooLarge(Exception):
    pass


class StorageError(OSError):
    """The files directory refused a write (not writable, full, gone).

    Its message names the file and the reason, never a server path: it reaches clients as a
    job's error or an upload's answer. The original error (with the path) is chained for logs.
    """


def _storage_error(exc: OSError, filename: str) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    reason = exc.strerror or str(exc) or type(exc).__name__
    err = StorageError(
        f"could not store {clean_filename(filename)!r}: {reason}"
        " (the server's files directory is not writable, or the disk is full)"
    )
    err.errno = exc.errno
    return err


def check_content_type(value: str) -> str:
    """``value`` if it is a media type safe to send back as a header, else ValueError."""
    if len(value) > MAX_CONTENT_TYPE or not _MEDIA_TYPE.fullmatch(value):
        raise ValueError(
            f"content type {value[:80]!r} is not a media type like 'image/png' (RFC 9110:"
            f" ASCII type/subtype[; name=value], no control characters, at most"
            f" {MAX_CONTENT_TYPE} characters)"
        )
    return value


def clean_filename(name: str | None, fallback: str = "file") -> str:
    """A display name safe for Content-Disposition (it never names a path on disk)."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE_NAME.sub("_", base).strip(" .")[:200]
    return base or fallback


def content_disposition(disposition: str, filename: str) -> str:
    """``inline``/``attachment`` with the name, RFC 6266 ``filename*`` when it is not ASCII."""
    if filename.isascii():
        return f'{disposition}; filename="{filename}"'
    fallback = filename.encode("ascii", "replace").decode().replace("?", "_")
    return f"{disposition}; filename=\"{fallback}\"; filename*=utf-8''{quote(filename)}"


@runtime_checkable
class FileMeta(Protocol):
    """Where file records live. ``put`` inserts or replaces (a job's artifact id is reused)."""

    def put(self, info: FileInfo) -> None: ...
    def get(self, file_id: str) -> FileInfo | None: ...
    def list(
        self, *, limit: int, cursor: int | None, job_id: str | None
    ) -> tuple[builtins.list[FileInfo], int | None]: ...
    def delete(self, file_id: str) -> bool: ...
    def created_before(self, cutoff: float) -> builtins.list[str]: ...
    def all_ids(self) -> set[str]: ...


class SqliteFileMeta:
    """The embedded default: the ``files`` table next to the jobs."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def put(self, info: FileInfo) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO files"
                " (id, filename, content_type, bytes, sha256, created_at, job_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    info.id,
                    info.filename,
                    info.content_type,
                    info.bytes,
                    info.sha256,
                    info.created_at,
                    info.job_id,
                ),
            )

    def get(self, file_id: str) -> FileInfo | None:
        row = self.db.connect().execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            return None
        return FileInfo(**{k: row[k] for k in FileInfo.model_fields})

    def list(
        self, *, limit: int, cursor: int | None, job_id: str | None
    ) -> tuple[builtins.list[FileInfo], int | None]:
        sql = "SELECT * FROM files WHERE 1=1"
        args: builtins.list[object] = []
        if cursor is not None:
            sql += " AND seq < ?"
            args.append(cursor)
        if job_id is not None:
            sql += " AND job_id = ?"
            args.append(job_id)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit + 1)
        rows = self.db.connect().execute(sql, args).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        items = [FileInfo(**{k: r[k] for k in FileInfo.model_fields}) for r in rows]
        return items, (rows[-1]["seq"] if more and rows else None)

    def delete(self, file_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            return bool(conn.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount)

        # Essential: deleting files is how space is freed on a full disk.
        return self.db.write(delete, essential=True)

    def created_before(self, cutoff: float) -> builtins.list[str]:
        rows = (
            self.db.connect()
            .execute("SELECT id FROM files WHERE created_at < ?", (cutoff,))
            .fetchall()
        )
        return [r["id"] for r in rows]

    def all_ids(self) -> set[str]:
        return {r["id"] for r in self.db.connect().execute("SELECT id FROM files").fetchall()}


class FileStore:
    """Blobs on a local (or shared) directory plus a ``FileMeta`` for their records.

    ``orphan_grace_s``: start-up cleanup leaves temp files and unrecorded blobs younger than
    this alone. 0 for the embedded store (nothing else writes while it starts); positive when
    other nodes write into the same directory and may be between rename and record.
    """

    def __init__(
        self, root: Path, meta: FileMeta | Database, *, orphan_grace_s: float = 0.0
    ) -> None:
        self.root = root
        self.db = meta if isinstance(meta, Database) else None
        self.meta: FileMeta = SqliteFileMeta(meta) if isinstance(meta, Database) else meta
        self.orphan_grace_s = orphan_grace_s
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.blobs.mkdir(mode=0o700, exist_ok=True)
            self.tmp.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            # Reads of what is stored may still work, and every write names the problem.
            log.error("file storage under %s is unusable (%s); saving files will fail", root, exc)

    # -- writing ---------------------------------------------------------------------------
    def open_temp(self) -> tuple[IO[bytes], Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix=temp_prefix(), suffix=".part")
        return os.fdopen(fd, "wb"), Path(name)

    def begin(
        self,
        *,
        filename: str,
        content_type: str,
        job_id: str | None = None,
        max_bytes: int | None = None,
        file_id: str | None = None,
    ) -> PendingFile:
        """A file to write piece by piece (``write``), then ``commit`` or ``abort``."""
        return PendingFile(
            self,
            filename=filename,
            content_type=content_type,
            job_id=job_id,
            max_bytes=max_bytes,
            file_id=file_id,
        )

    def commit_temp(
        self,
        fh: IO[bytes],
        temp: Path,
        *,
        filename: str,
        content_type: str,
        sha256: str,
        size: int,
        job_id: str | None = None,
        file_id: str | None = None,
    ) -> FileInfo:
        """fsync + rename the finished temp file into place, then record it.

        ``file_id`` (a job artifact's derived id) replaces any file of that id; by default a
        new random id is drawn.
        """
        try:
            if file_id is not None and not is_file_id(file_id):
                raise ValueError(f"invalid file id {file_id!r}")
            check_content_type(content_type)
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            file_id = file_id or new_file_id()
            os.replace(temp, self.blobs / file_id)
            self._fsync_dir(self.blobs)
        except BaseException as exc:
            # close() retries the flush that failed (ENOSPC): it must not skip the unlink.
            with contextlib.suppress(OSError):
                fh.close()
            temp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise _storage_error(exc, filename) from exc
            raise
        info = FileInfo(
            id=file_id,
            filename=clean_filename(filename),
            content_type=content_type,
            bytes=size,
            sha256=sha256,
            created_at=time.time(),
            job_id=job_id,
        )
        try:
            self.meta.put(info)
        except BaseException:
            # No record, no blob: the write never happened (rather than an orphan until restart).
            self._unlink_blob(file_id)
            raise
        return info

    def put_bytes(
        self,
        data: bytes,
        *,
        filename: str,
        content_type: str,
        job_id: str | None = None,
        file_id: str | None = None,
    ) -> FileInfo:
        return self.put_chunks(
            [data], filename=filename, content_type=content_type, job_id=job_id, file_id=file_id
        )

    def put_chunks(
        self,
        chunks: Iterable[bytes],
        *,
        filename: str,
        content_type: str,
        job_id: str | None = None,
        max_bytes: int | None = None,
        file_id: str | None = None,
    ) -> FileInfo:
        pending = self.begin(
            filename=filename,
            content_type=content_type,
            job_id=job_id,
            max_bytes=max_bytes,
            file_id=file_id,
        )
        try:
            for chunk in chunks:
                pending.write(chunk)
        except BaseException as exc:
            pending.abort()
            if isinstance(exc, OSError):
                raise _storage_error(exc, filename) from exc
            raise
        return pending.commit()

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _unlink_blob(self, file_id: str) -> None:
        (self.blobs / file_id).unlink(missing_ok=True)

    # -- reading ---------------------------------------------------------------------------
    def get(self, file_id: str) -> FileInfo | None:
        if not is_file_id(file_id):
            return None
        return self.meta.get(file_id)

    def blob_path(self, info: FileInfo) -> Path:
        if not is_file_id(info.id):
            raise ValueError("invalid file id")
        return self.blobs / info.id

    def list(
        self, *, limit: int = 50, cursor: int | None = None, job_id: str | None = None
    ) -> tuple[list[FileInfo], int | None]:
        return self.meta.list(limit=limit, cursor=cursor, job_id=job_id)

    # -- deleting --------------------------------------------------------------------------
    def delete(self, file_id: str) -> bool:
        if not is_file_id(file_id):
            return False
        # Record first, blob second: a reader never finds a record whose blob is gone for good.
        try:
            deleted = self.meta.delete(file_id)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            # Too full even to record a deletion: the blob's own space makes the room.
            log.warning("disk full: deleting the content of %s before its record", file_id)
            self._unlink_blob(file_id)
            deleted = self.meta.delete(file_id)
        self._unlink_blob(file_id)
        return deleted

    def delete_many(self, file_ids: Iterable[str]) -> None:
        for file_id in file_ids:
            self.delete(file_id)

    def delete_for_job(self, job_id: str, keep: Iterable[str] = ()) -> int:
        """Delete the files ``job_id`` produced, except ``keep``; returns how many."""
        kept = set(keep)
        removed = 0
        cursor: int | None = None
        while True:
            page, cursor = self.list(job_id=job_id, limit=500, cursor=cursor)
            for info in page:
                if info.id not in kept:
                    self.delete(info.id)
                    removed += 1
            if cursor is None:
                return removed

    def sweep_expired(self, ttl_s: float, now: float | None = None) -> int:
        """Delete files older than ``ttl_s`` (retention); returns how many."""
        if ttl_s <= 0:
            return 0
        cutoff = (time.time() if now is None else now) - ttl_s
        ids = self.meta.created_before(cutoff)
        for file_id in ids:
            self.delete(file_id)
        if ids:
            log.info("retention removed %d file(s) older than %.0fs", len(ids), ttl_s)
        return len(ids)

    def remove_orphans(self) -> int:
        """Start-up cleanup: temp files of interrupted writes, blobs with no record.

        Best effort: a failure is logged, never fatal (a node whose metadata store is down
        still starts, and answers 503 until it is back).
        """
        try:
            return self._remove_orphans()
        except Exception:
            log.exception("cleaning up orphaned files failed; skipped")
            return 0

    def _remove_orphans(self) -> int:
        removed = 0
        young = time.time() - self.orphan_grace_s
        for temp in self.tmp.iterdir():
            if not (temp.is_file() or temp.is_symlink()) or _written_by_live_process(temp.name):
                continue
            if self._older(temp, young):
                temp.unlink(missing_ok=True)
                removed += 1
        known = self.meta.all_ids()
        for blob in self.blobs.iterdir():
            if blob.name in known or not (blob.is_file() or blob.is_symlink()):
                continue
            # Re-check the record: another node may have recorded it since ``all_ids``.
            if self._older(blob, young) and (
                not is_file_id(blob.name) or self.meta.get(blob.name) is None
            ):
                blob.unlink(missing_ok=True)
                removed += 1
        for file_id in known:
            if not (self.blobs / file_id).exists():
                self.meta.delete(file_id)
                removed += 1
        if removed:
            log.info("start-up cleanup removed %d orphaned file(s)", removed)
        return removed

    def _older(self, path: Path, cutoff: float) -> bool:
        if self.orphan_grace_s <= 0:
            return True
        try:
            return path.lstat().st_mtime < cutoff
        except FileNotFoundError:
            return False


def temp_prefix(pid: int | None = None) -> str:
    """How the names of the temp files a process (default: this one) writes begin."""
    return f"{_HOST}.{os.getpid() if pid is None else pid}."


def _written_by_live_process(temp_name: str) -> bool:
    """True if a temp file's writer, named in it (``open_temp``), is a process alive here."""
    host, _, rest = temp_name.partition(".")
    pid_text = rest.partition(".")[0]
    if host != _HOST or not pid_text.isdigit():
        return False  # another node's (its grace period applies) or an older release's
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


class PendingFile:
    """A file being written to a temp file; ``commit`` stores it, ``abort`` leaves nothing.

    The content type is checked before anything is written: it is sent back as a header.
    """

    def __init__(
        self,
        store: FileStore,
        *,
        filename: str,
        content_type: str,
        job_id: str | None,
        max_bytes: int | None,
        file_id: str | None,
    ) -> None:
        self.store = store
        self.filename = filename
        self.content_type = check_content_type(content_type)
        self.job_id = job_id
        self.max_bytes = max_bytes
        self.file_id = file_id
        self.size = 0
        self._digest = hashlib.sha256()
        self._fh: IO[bytes] | None = None
        self._temp: Path | None = None

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            self.abort()
            raise FileTooLarge(f"file is larger than {self.max_bytes} bytes")
        try:
            if self._fh is None:
                self._fh, self._temp = self.store.open_temp()
            self._digest.update(chunk)
            self._fh.write(chunk)
        except OSError as exc:
            self.abort()
            raise _storage_error(exc, self.filename) from exc

    def commit(self) -> FileInfo:
        try:
            if self._fh is None:
                self._fh, self._temp = self.store.open_temp()
        except OSError as exc:
            raise _storage_error(exc, self.filename) from exc
        fh, temp = self._fh, self._temp
        assert temp is not None
        self._fh = self._temp = None  # commit_temp cleans up after itself
        return self.store.commit_temp(
            fh,
            temp,
            filename=self.filename,
            content_type=self.content_type,
            sha256=self._digest.hexdigest(),
            size=self.size,
            job_id=self.job_id,
            file_id=self.file_id,
        )

    def abort(self) -> None:
        fh, temp = self._fh, self._temp
        self._fh = self._temp = None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()
        if temp is not None:
            temp.unlink(missing_ok=True)
