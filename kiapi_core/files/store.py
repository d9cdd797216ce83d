"""Blobs under ``$KIAPI_HOME/files/blobs/<id>``, metadata rows in SQLite.

Paths are only ever built from ids that passed the id pattern, never from user input. A blob
becomes visible by an atomic rename after fsync, and its row is written after the rename, so a
crash leaves at worst an orphan blob or temp file, which start-up removes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO
from urllib.parse import quote

from kiapi_core.db import Database
from kiapi_core.files.schemas import FileInfo
from kiapi_core.ids import is_file_id, new_file_id

log = logging.getLogger("kiapi.files")

# Letters and digits of any script, and . _ - space; everything else becomes "_".
_UNSAFE_NAME = re.compile(r"[^\w. -]+")


class FileTooLarge(Exception):
    pass


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


class FileStore:
    def __init__(self, root: Path, db: Database) -> None:
        self.root = root
        self.db = db
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    # -- writing ---------------------------------------------------------------------------
    def open_temp(self) -> tuple[IO[bytes], Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        return os.fdopen(fd, "wb"), Path(name)

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
    ) -> FileInfo:
        """fsync + rename the finished temp file into place, then record it."""
        try:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            file_id = new_file_id()
            os.replace(temp, self.blobs / file_id)
            self._fsync_dir(self.blobs)
        except BaseException:
            fh.close()
            temp.unlink(missing_ok=True)
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
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT INTO files"
                    " (id, filename, content_type, bytes, sha256, created_at, job_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (info.id, info.filename, info.content_type, info.bytes, info.sha256,
                     info.created_at, info.job_id),
                )
        except BaseException:
            # No row, no blob: the write never happened (rather than an orphan until restart).
            (self.blobs / file_id).unlink(missing_ok=True)
            raise
        return info

    def put_bytes(
        self, data: bytes, *, filename: str, content_type: str, job_id: str | None = None
    ) -> FileInfo:
        return self.put_chunks([data], filename=filename, content_type=content_type, job_id=job_id)

    def put_chunks(
        self,
        chunks: Iterable[bytes],
        *,
        filename: str,
        content_type: str,
        job_id: str | None = None,
        max_bytes: int | None = None,
    ) -> FileInfo:
        fh, temp = self.open_temp()
        digest = hashlib.sha256()
        size = 0
        try:
            for chunk in chunks:
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise FileTooLarge(f"file is larger than {max_bytes} bytes")
                digest.update(chunk)
                fh.write(chunk)
        except BaseException:
            fh.close()
            temp.unlink(missing_ok=True)
            raise
        return self.commit_temp(
            fh, temp, filename=filename, content_type=content_type,
            sha256=digest.hexdigest(), size=size, job_id=job_id,
        )

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading ---------------------------------------------------------------------------
    def get(self, file_id: str) -> FileInfo | None:
        if not is_file_id(file_id):
            return None
        row = self.db.connect().execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            return None
        return FileInfo(**{k: row[k] for k in FileInfo.model_fields})

    def blob_path(self, info: FileInfo) -> Path:
        if not is_file_id(info.id):
            raise ValueError("invalid file id")
        return self.blobs / info.id

    def list(
        self, *, limit: int = 50, cursor: int | None = None, job_id: str | None = None
    ) -> tuple[list[FileInfo], int | None]:
        sql = "SELECT * FROM files WHERE 1=1"
        args: list[object] = []
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

    # -- deleting --------------------------------------------------------------------------
    def delete(self, file_id: str) -> bool:
        if not is_file_id(file_id):
            return False
        with self.db.transaction() as conn:
            deleted = conn.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        (self.blobs / file_id).unlink(missing_ok=True)
        return bool(deleted)

    def delete_many(self, file_ids: Iterable[str]) -> None:
        for file_id in file_ids:
            self.delete(file_id)

    def sweep_expired(self, ttl_s: float, now: float | None = None) -> int:
        """Delete files older than ``ttl_s`` (retention); returns how many."""
        if ttl_s <= 0:
            return 0
        cutoff = (time.time() if now is None else now) - ttl_s
        rows = self.db.connect().execute(
            "SELECT id FROM files WHERE created_at < ?", (cutoff,)
        ).fetchall()
        for row in rows:
            self.delete(row["id"])
        if rows:
            log.info("retention removed %d file(s) older than %.0fs", len(rows), ttl_s)
        return len(rows)

    def remove_orphans(self) -> int:
        """Start-up cleanup: temp files of interrupted writes, blobs with no metadata row."""
        removed = 0
        for temp in self.tmp.iterdir():
            if temp.is_file() or temp.is_symlink():
                temp.unlink(missing_ok=True)
                removed += 1
        known = {r["id"] for r in self.db.connect().execute("SELECT id FROM files").fetchall()}
        for blob in self.blobs.iterdir():
            if blob.name not in known and (blob.is_file() or blob.is_symlink()):
                blob.unlink(missing_ok=True)
                removed += 1
        with self.db.transaction() as conn:
            for file_id in known:
                if not (self.blobs / file_id).exists():
                    conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
                    removed += 1
        if removed:
            log.info("start-up cleanup removed %d orphaned file(s)", removed)
        return removed
