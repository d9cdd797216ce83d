"""Default plugin ``kiapi.files``: upload, list, read, download and delete files (/v1/files)."""

from __future__ import annotations

from typing import Any

from starlette.routing import BaseRoute

from kiapi_core.files.routes import routes
from kiapi_core.files.schemas import FileInfo, FileList
from kiapi_core.hookspecs import hookimpl
from kiapi_core.meta.schemas import Error
from kiapi_core.settings import Settings
from kiapi_core.web.openapi import (
    INVALID,
    NOT_FOUND,
    PAGING_PARAMS,
    cached_fragment,
    error_response,
    json_response,
    operation,
    path_param,
    query_param,
)
from kiapi_core.web.schema import components_from, ref

_FILE = [path_param("file_id", "file_0123456789abcdef")]


def fragment() -> dict[str, Any]:
    files_tag = "files"
    return {
        "paths": {
            "/v1/files": {
                "get": operation(
                    "List files, newest first",
                    {"200": json_response(ref("FileList"), "A page of files."), "422": INVALID},
                    tag=files_tag,
                    parameters=[
                        query_param(
                            "job_id",
                            {"type": "string", "pattern": "^job_[0-9a-f]{16}$"},
                            "Only files produced by this job.",
                        ),
                        *PAGING_PARAMS,
                    ],
                ),
                "post": operation(
                    "Upload a file (multipart/form-data, field `file`)",
                    {
                        "201": json_response(ref("FileInfo"), "Stored."),
                        "413": error_response("Larger than KIAPI_MAX_UPLOAD_BYTES."),
                        "415": error_response("Not multipart/form-data."),
                        "422": INVALID,
                        "503": error_response(
                            "The files directory refused the write (not writable, full)."
                        ),
                    },
                    tag=files_tag,
                    requestBody={
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["file"],
                                    "properties": {"file": {"type": "string", "format": "binary"}},
                                }
                            }
                        },
                    },
                ),
            },
            "/v1/files/{file_id}": {
                "get": operation(
                    "File metadata",
                    {"200": json_response(ref("FileInfo"), "Metadata."), "404": NOT_FOUND},
                    tag=files_tag,
                    parameters=_FILE,
                ),
                "delete": operation(
                    "Delete a file",
                    {
                        "200": json_response(
                            {
                                "type": "object",
                                "properties": {
                                    "id": {"type": "string"},
                                    "deleted": {"type": "boolean"},
                                },
                                "required": ["id", "deleted"],
                            },
                            "Deleted.",
                        ),
                        "404": NOT_FOUND,
                    },
                    tag=files_tag,
                    parameters=_FILE,
                ),
            },
            "/v1/files/{file_id}/download": {
                "get": operation(
                    "Download a file's bytes (streamed, ETag, Range)",
                    {
                        "200": {
                            "description": (
                                "The content with its Content-Type and Content-Disposition."
                            ),
                            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                        },
                        "206": {
                            "description": "The requested byte range.",
                            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                        },
                        "304": {"description": "Unchanged (If-None-Match matched the ETag)."},
                        "404": NOT_FOUND,
                        "410": error_response("The content is gone from disk."),
                        "416": error_response(
                            "The Range starts past the end; Content-Range has the size."
                        ),
                    },
                    tag=files_tag,
                    parameters=_FILE,
                )
            },
        },
        "components": {"schemas": components_from(Error, FileInfo, FileList)},
    }


@hookimpl
def register_routes(settings: Settings) -> list[BaseRoute]:
    return list(routes)


@hookimpl
def register_openapi() -> dict[str, Any]:
    return cached_fragment("kiapi.files", fragment, packages=["kiapi_core"])
