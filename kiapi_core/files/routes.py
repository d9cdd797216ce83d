"""/v1/files: upload, list, read metadata, download (streamed), delete."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator
from stat import S_ISREG

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    Response,
)
from starlette.routing import Route
from starlette.types import Send

from kiapi_core.files.schemas import FileInfo
from kiapi_core.files.store import (
    FileStore,
    FileTooLarge,
    PendingFile,
    StorageError,
    check_content_type,
    content_disposition,
)
from kiapi_core.host import host
from kiapi_core.ids import is_file_id, is_job_id
from kiapi_core.state.diskfull import is_disk_full
from kiapi_core.web.errors import ApiError, disk_full_error, invalid
from kiapi_core.web.paging import cursor_param, limit_param

log = logging.getLogger("kiapi.files")

# Downloads up to this size are read on the event loop in one go (see _Download).
SMALL_FILE = 64 * 1024
# Blobs never change: a download may be cached for good.
CACHE = "private, max-age=31536000, immutable"

# Multipart upload limits (SECURITY.md). A file name is a display label (cleaned to 200
# characters); the Content-Disposition that carries it gets that much plus room for the rest.
MAX_FILENAME_BYTES = 1024
MAX_DISPOSITION_BYTES = MAX_FILENAME_BYTES + 256
MAX_PART_HEADER_BYTES = 8192
MAX_PART_HEADERS = 16
MAX_FIELDS = 16
MAX_FIELD_BYTES = 64 * 1024
# Upload data is written off the event loop in batches of about this size.
FLUSH_BYTES = 1024 * 1024
# After a refused upload, up to this much of the rest of the body is read and dropped, so the
# client gets to read the answer instead of a connection reset.
DRAIN_BYTES = 16 * 1024 * 1024


async def _info_or_404(request: Request) -> FileInfo:
    file_id = request.path_params["file_id"]
    h = host(request)
    info = await h.call(h.files.get, file_id) if is_file_id(file_id) else None
    if info is None:
        raise ApiError(404, f"no file {file_id[:64]!r}; file ids look like file_0123456789abcdef")
    return info


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _malformed(why: str) -> ApiError:
    return invalid(
        ["body"],
        f"malformed multipart/form-data ({why}); send one part named 'file'",
        "multipart_invalid",
    )


class _Upload:
    """Parses a multipart body as it streams in, straight into the file store's temp area.

    Nothing is spooled anywhere else (Starlette's ``request.form()`` would copy the file to
    the system temp directory first). One file part, named ``file``; other fields are read
    and dropped.
    """

    def __init__(self, files: FileStore, max_bytes: int) -> None:
        self.files = files
        self.max_bytes = max_bytes
        self.pending: PendingFile | None = None
        self.buffered: list[bytes] = []
        self.buffered_bytes = 0
        self.file_parts = 0
        self.fields = 0
        self.ended = False
        self._part_is_file = False
        self._field_bytes = 0
        self._headers: dict[bytes, bytes] = {}
        self._name = b""
        self._value = b""

    # -- python-multipart callbacks (on the event loop: no I/O here) ---------------------------
    def on_part_begin(self) -> None:
        self._headers, self._name, self._value = {}, b"", b""
        self._part_is_file, self._field_bytes = False, 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]
        if len(self._name) > MAX_PART_HEADER_BYTES:
            raise _malformed(f"a part header name is longer than {MAX_PART_HEADER_BYTES} bytes")

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]
        if self._name.lower() == b"content-disposition":
            if len(self._value) > MAX_DISPOSITION_BYTES:
                raise self._filename_too_long()
        elif len(self._value) > MAX_PART_HEADER_BYTES:
            raise _malformed(f"a part header is longer than {MAX_PART_HEADER_BYTES} bytes")

    def on_header_end(self) -> None:
        if len(self._headers) >= MAX_PART_HEADERS:
            raise _malformed(f"a part has more than {MAX_PART_HEADERS} headers")
        self._headers[self._name.lower().strip()] = self._value.strip()
        self._name, self._value = b"", b""

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise _malformed("each part needs Content-Disposition: form-data; name=...")
        if b"filename" not in options:
            self.fields += 1
            if self.fields > MAX_FIELDS:
                raise _malformed(f"more than {MAX_FIELDS} form fields")
            return
        self.file_parts += 1
        if self.file_parts > 1:
            raise invalid(["body"], "one file per upload: send a single part named 'file'")
        if options[b"name"] != b"file":
            return  # its data is dropped; "file" is reported missing at the end
        if len(options[b"filename"]) > MAX_FILENAME_BYTES:
            raise self._filename_too_long()
        filename = _decode(options[b"filename"]) or "upload"
        content_type = _decode(self._headers.get(b"content-type", b"")).strip()
        try:
            check_content_type(content_type or "application/octet-stream")
        except ValueError as exc:
            raise invalid(["body", "file", "content_type"], str(exc)) from None
        self.pending = self.files.begin(
            filename=filename,
            content_type=content_type or "application/octet-stream",
            max_bytes=self.max_bytes,
        )
        self._part_is_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_is_file:
            self.buffered.append(data[start:end])
            self.buffered_bytes += end - start
            return
        self._field_bytes += end - start
        if self._field_bytes > MAX_FIELD_BYTES:
            raise _malformed(f"a form field is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        self._part_is_file = False

    def on_end(self) -> None:
        self.ended = True

    @staticmethod
    def _filename_too_long() -> ApiError:
        return invalid(
            ["body", "file", "filename"],
            f"the file name is longer than {MAX_FILENAME_BYTES} bytes (UTF-8); send a shorter one",
            "string_too_long",
        )

    # -- the rest runs off the loop ---------------------------------------------------------
    def flush(self) -> None:
        chunks, self.buffered, self.buffered_bytes = self.buffered, [], 0
        if self.pending is not None:
            for chunk in chunks:
                self.pending.write(chunk)

    def abort(self) -> None:
        if self.pending is not None:
            self.pending.abort()

    async def receive(self, content_type: str, chunks: AsyncIterator[bytes]) -> FileInfo:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary or len(boundary) > 200:
            raise _malformed("the Content-Type needs a boundary of 1 to 200 characters")
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self.on_part_begin,
                "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end,
                "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value,
                "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished,
                "on_end": self.on_end,
            },
            # Our own limits above come first and name the problem.
            max_header_count=MAX_PART_HEADERS + 1,
            max_header_size=1024 * 1024,
        )
        try:
            async for chunk in chunks:
                parser.write(chunk)
                if self.buffered_bytes >= FLUSH_BYTES:
                    await run_in_threadpool(self.flush)
            parser.finalize()
            if not self.ended:
                raise _malformed("the body ended before the closing boundary")
            if self.pending is None:
                raise invalid(
                    ["body", "file"],
                    "a multipart field named 'file' holding the file is required",
                    "missing",
                )
            await run_in_threadpool(self.flush)
            return await run_in_threadpool(self.pending.commit)
        except FileTooLarge:
            self.abort()
            limit = self.max_bytes
            raise ApiError(413, f"file is larger than KIAPI_MAX_UPLOAD_BYTES={limit}") from None
        except StorageError as exc:
            self.abort()
            log.error("upload failed: %s (%s)", exc, exc.__cause__)
            raise (disk_full_error() if is_disk_full(exc) else ApiError(503, str(exc))) from None
        except FormParserError as exc:
            self.abort()
            raise _malformed(str(exc)[:200]) from None
        except BaseException:
            self.abort()
            raise


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    drained = 0
    with contextlib.suppress(Exception):
        async for chunk in chunks:
            drained += len(chunk)
            if drained > DRAIN_BYTES:
                return


async def upload_file(request: Request) -> Response:
    h = host(request)
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(
            415,
            "upload with Content-Type multipart/form-data and the file in a field named 'file'",
        )
    chunks = request.stream()
    try:
        info = await _Upload(h.files, h.settings.max_upload_bytes).receive(ctype, chunks)
    except ApiError:
        await _drain(chunks)
        raise
    return JSONResponse(
        info.model_dump(), status_code=201, headers={"Location": f"/v1/files/{info.id}"}
    )


async def list_files(request: Request) -> Response:
    q = request.query_params
    job_id = q.get("job_id")
    if job_id is not None and not is_job_id(job_id):
        raise invalid(["query", "job_id"], "must look like job_0123456789abcdef", "pattern")
    h = host(request)
    items, nxt = await h.call(
        h.files.list, limit=limit_param(q), cursor=cursor_param(q), job_id=job_id
    )
    return JSONResponse(
        {"files": [i.model_dump() for i in items], "next_cursor": str(nxt) if nxt else None}
    )


async def get_file(request: Request) -> Response:
    return JSONResponse((await _info_or_404(request)).model_dump())


async def download_file(request: Request) -> Response:
    info = await _info_or_404(request)
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
    info = await _info_or_404(request)
    await run_in_threadpool(host(request).files.delete, info.id)
    return JSONResponse({"id": info.id, "deleted": True})


routes = [
    Route("/v1/files", upload_file, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", get_file, methods=["GET"]),
    Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id}/download", download_file, methods=["GET"]),
]
