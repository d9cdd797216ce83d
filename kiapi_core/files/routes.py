"""/v1/files: upload, list, read metadata, download (streamed), delete."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from stat import S_ISREG
from typing import IO

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    Response,
)
from starlette.routing import Route
from starlette.types import Send

from kiapi_core.errors import ApiError, invalid
from kiapi_core.files.schemas import FileInfo
from kiapi_core.files.store import FileTooLarge, StorageError, content_disposition
from kiapi_core.host import host
from kiapi_core.ids import is_file_id, is_job_id
from kiapi_core.paging import cursor_param, limit_param

log = logging.getLogger("kiapi.files")

CHUNK = 1024 * 1024
# Downloads up to this size are read on the event loop in one go (see _Download).
SMALL_FILE = 64 * 1024
# Blobs never change: a download may be cached for good.
CACHE = "private, max-age=31536000, immutable"


def _info_or_404(request: Request) -> FileInfo:
    file_id = request.path_params["file_id"]
    info = host(request).files.get(file_id) if is_file_id(file_id) else None
    if info is None:
        raise ApiError(404, f"no file {file_id[:64]!r}; file ids look like file_0123456789abcdef")
    return info


def _chunks(fh: IO[bytes]) -> Iterator[bytes]:
    while chunk := fh.read(CHUNK):
        yield chunk


async def upload_file(request: Request) -> Response:
    h = host(request)
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(
            415,
            "upload with Content-Type multipart/form-data and the file in a field named 'file'",
        )
    try:
        form = await request.form(max_files=1, max_fields=16)
    except HTTPException as exc:
        # Starlette answers an unparsable multipart body with a bare 400; name the problem
        # the way every other malformed body is named (422, loc body).
        raise invalid(
            ["body"],
            f"malformed multipart/form-data ({exc.detail}); send one part named 'file'",
            "multipart_invalid",
        ) from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise invalid(
                ["body", "file"],
                "a multipart field named 'file' holding the file is required",
                "missing",
            )
        try:
            info = await run_in_threadpool(
                h.files.put_chunks,
                _chunks(upload.file),
                filename=upload.filename or "upload",
                content_type=upload.content_type or "application/octet-stream",
                max_bytes=h.settings.max_upload_bytes,
            )
        except FileTooLarge:
            limit = h.settings.max_upload_bytes
            raise ApiError(413, f"file is larger than KIAPI_MAX_UPLOAD_BYTES={limit}") from None
        except StorageError as exc:
            log.error("upload failed: %s (%s)", exc, exc.__cause__)
            raise ApiError(503, str(exc)) from None
    finally:
        await form.close()
    return JSONResponse(
        info.model_dump(), status_code=201, headers={"Location": f"/v1/files/{info.id}"}
    )


async def list_files(request: Request) -> Response:
    q = request.query_params
    job_id = q.get("job_id")
    if job_id is not None and not is_job_id(job_id):
        raise invalid(["query", "job_id"], "must look like job_0123456789abcdef", "pattern")
    items, nxt = host(request).files.list(
        limit=limit_param(q), cursor=cursor_param(q), job_id=job_id
    )
    return JSONResponse(
        {"files": [i.model_dump() for i in items], "next_cursor": str(nxt) if nxt else None}
    )


async def get_file(request: Request) -> Response:
    return JSONResponse(_info_or_404(request).model_dump())


async def download_file(request: Request) -> Response:
    info = _info_or_404(request)
    etag = f'"{info.sha256}"'
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": CACHE})
    path = host(request).files.blob_path(info)
    try:
        # One stat here, on the loop (microseconds), instead of a thread hop in the response.
        stat_result = os.stat(path)
    except OSError:
        stat_result = None
    if stat_result is None or not S_ISREG(stat_result.st_mode):
        raise ApiError(410, f"the content of {info.id} is gone from disk")
    return _Download(
        path,
        stat_result=stat_result,
        media_type=info.content_type,
        headers={
            "ETag": etag,
            "X-Kiapi-File-Id": info.id,
            "Cache-Control": CACHE,
            "Content-Disposition": content_disposition("attachment", info.filename),
            # Uploaded content is served as typed, never sniffed into something else.
            "X-Content-Type-Options": "nosniff",
        },
    )


class _Download(FileResponse):
    """A FileResponse whose Range answers follow RFC 9110 and kiapi's JSON errors, and which
    sends small files in one piece.

    Starlette's own parser reads ``bytes=--1`` as a suffix of -1 bytes (416), takes ``+1`` and
    ``1_0`` for numbers, serves the valid part of a list with invalid parts, and answers 416
    when one range of a list starts past the end. Here (RFC 9110 sections 14.1.1 and 14.2):

    - a Range that is not ``bytes=`` followed by 1 to ``MAX_RANGES`` range specs made of ASCII
      digits (``first-last``, ``first-``, ``-suffix``; empty list elements allowed), or that
      has ``last < first`` anywhere, is ignored as a whole: 200 with the whole file, as the
      RFC lets a server do with an invalid or excessive Range;
    - specs that cannot be satisfied (starting at or past the end, ``-0``) are left out; if
      none is left, a JSON 416 with ``Content-Range: bytes */size``;
    - the rest are sorted and overlapping or adjacent ones merged: one range is a plain 206,
      several a ``multipart/byteranges`` 206;
    - an empty file is always sent whole (no range of it can be expressed).
    """

    MAX_RANGES = 100

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        ranges = _satisfiable_ranges(http_range, file_size, cls.MAX_RANGES)
        if ranges is None or file_size == 0:
            return []  # ignored: the whole file
        if not ranges:
            # Raised before anything was sent, so the app's error handlers answer it.
            raise ApiError(
                416,
                f"Range {http_range[:100]!r} cannot be satisfied: the file has {file_size} bytes",
                headers={"Content-Range": f"bytes */{file_size}"},
            )
        ranges.sort()
        merged = [ranges[0]]
        for start, end in ranges[1:]:
            last_start, last_end = merged[-1]
            if start <= last_end:
                merged[-1] = (last_start, max(last_end, end))
            else:
                merged.append((start, end))
        return merged

    async def _handle_simple(self, send: Send, send_header_only: bool, send_pathsend: bool) -> None:
        size = self.stat_result.st_size if self.stat_result is not None else SMALL_FILE + 1
        if send_header_only or send_pathsend or size > SMALL_FILE:
            await super()._handle_simple(send, send_header_only, send_pathsend)
            return
        # A small blob is read straight from the page cache: one read costs microseconds,
        # while the open/read/close thread hops of a streamed file cost milliseconds of
        # latency when a busy CPU delays waking the thread pool.
        with open(self.path, "rb") as fh:
            body = fh.read(size)
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})


_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")


def _satisfiable_ranges(
    http_range: str, file_size: int, max_ranges: int
) -> list[tuple[int, int]] | None:
    """The satisfiable ranges of a Range header as ``(start, end)`` half-open pairs, or None
    when the header is invalid or lists more than ``max_ranges`` specs (to be ignored)."""
    unit, eq, range_set = http_range.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    specs = [spec.strip(" \t") for spec in range_set.split(",")]
    specs = [spec for spec in specs if spec]
    if not specs or len(specs) > max_ranges:
        return None
    ranges: list[tuple[int, int]] = []
    for spec in specs:
        match = _RANGE_SPEC.fullmatch(spec)
        if match is None:
            return None
        first, last = match.groups()
        try:
            if first:
                start = int(first)
                end = int(last) + 1 if last else file_size
                if last and end <= start:
                    return None  # last-pos before first-pos: invalid
                if start < file_size:
                    ranges.append((start, min(end, file_size)))
            elif last:
                suffix = int(last)
                if suffix > 0:
                    ranges.append((max(file_size - suffix, 0), file_size))
            else:
                return None  # a lone "-"
        except ValueError:
            return None  # more digits than int() takes: not worth serving
    return ranges


def _matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match uses the weak comparison: ``W/"x"`` matches ``"x"``; ``*`` matches all."""
    if not if_none_match:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


async def delete_file(request: Request) -> Response:
    info = _info_or_404(request)
    await run_in_threadpool(host(request).files.delete, info.id)
    return JSONResponse({"id": info.id, "deleted": True})


routes = [
    Route("/v1/files", upload_file, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", get_file, methods=["GET"]),
    Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id}/download", download_file, methods=["GET"]),
]
