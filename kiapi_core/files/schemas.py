"""File metadata as served by /v1/files."""

from __future__ import annotations

from pydantic import Field

from kiapi_core.web.schema import Schema


class FileInfo(Schema):
    id: str = Field(description="`file_` + 16 hex digits.")
    filename: str = Field(description="Name given at upload or by the producing job.")
    content_type: str = Field(description="Media type served at /download.")
    bytes: int = Field(description="Size in bytes.")
    sha256: str = Field(description="Hex SHA-256 of the content; also the download ETag.")
    created_at: float = Field(description="Unix time the file was stored.")
    job_id: str | None = Field(None, description="The job that produced it; null for uploads.")


class FileList(Schema):
    files: list[FileInfo] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page; null at the end."
    )
