"""OpenAI Images API shapes as pydantic models: the request check and the OpenAPI source."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, Strict, field_validator

from kiapi_core.web.schema import Schema, optional

MAX_N = 4
# OpenAI's own limit for prompts; a JSON caption passed as a string fits easily.
MAX_PROMPT_CHARS = 32_000
StrictInt = Annotated[int, Strict()]
SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"
_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
# DALL-E 3 spells its two levels standard/hd; they fold into ours.
QUALITY_ALIASES = {"standard": "medium", "hd": "high"}


class ImageGenerationRequest(Schema):
    """OpenAI's image generation request. Unknown fields are accepted and ignored by the host
    (a capability may read its own extensions from them)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="What to draw. Capabilities that take structured captions accept one as a "
        "JSON string here.",
    )
    model: str | None = optional(
        "A model from GET /v1/models: its `id` (`family/name`), name, alias or family. Omit for "
        "the default model of the first installed image capability."
    )
    n: StrictInt | None = Field(
        1,
        ge=1,
        le=MAX_N,
        description="Images to make, 1..4; each runs as its own job with its own seed.",
    )
    size: str | None = Field(
        "auto",
        description="`WIDTHxHEIGHT` in pixels (e.g. `1024x1024`) or `auto` for the capability's "
        "default; the capability states its own bounds (a 400 names them).",
        examples=["1024x1024", "512x768", "auto"],
        # Documented, but checked by the validator below, whose message says what to send.
        json_schema_extra={"pattern": SIZE_PATTERN},
    )
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = Field(
        "auto",
        description="Speed/quality trade-off, mapped by the capability to its presets; `auto` is "
        "the server's default. DALL-E's `standard`/`hd` mean `medium`/`high`.",
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        "b64_json",
        description="`b64_json`: the image inline; `url`: an absolute download URL of the files "
        "API (it needs the same bearer token when the server has an API key).",
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(
        "png", description="Encoding of the images."
    )
    output_compression: StrictInt | None = optional(
        "0..100: encoder quality for jpeg and webp (ignored for png). Omit for the capability's "
        "default.",
        ge=0,
        le=100,
    )
    seed: StrictInt | None = optional(
        "kiapi extension: seed of the first image; image i gets seed + i. Omit to draw random, "
        "distinct seeds (each image's seed is in its job's `params`).",
        ge=0,
    )
    user: str | None = optional("Accepted for compatibility and ignored.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and value != "auto" and not _SIZE.match(value):
            raise ValueError(
                f"size must be 'WIDTHxHEIGHT' in pixels (e.g. '1024x1024') or 'auto', got {value!r}"
            )
        return value

    def dimensions(self) -> tuple[int, int] | None:
        """(width, height), or None for the capability's default size."""
        match = _SIZE.match(self.size or "auto")
        return (int(match.group(1)), int(match.group(2))) if match else None


class Image(Schema):
    """One generated image: `b64_json` or `url`, as asked."""

    b64_json: str | None = optional("The encoded image, base64 (response_format=b64_json).")
    url: str | None = optional(
        "Absolute download URL in the files API (response_format=url); send the bearer token "
        "when the server has an API key."
    )
    revised_prompt: str | None = optional("The prompt as used (kiapi does not rewrite prompts).")
    kiapi_job_id: str = Field(description="kiapi extension: the job that made this image.")
    kiapi_file_id: str = Field(description="kiapi extension: the image in the files API.")


class ImagesResponse(Schema):
    """OpenAI's images response, plus kiapi extensions."""

    created: int = Field(description="Unix time the response was made.")
    data: list[Image] = Field(description="One entry per image, in request order.")
    output_format: Literal["png", "jpeg", "webp"] = Field(description="Encoding of the images.")
    model: str = Field(description="kiapi extension: the model that ran (`family/name`).")
    kiapi_job_ids: list[str] = Field(description="kiapi extension: the jobs, one per image.")


class OpenAIErrorDetail(Schema):
    message: str = Field(description="What went wrong and what to do about it.")
    type: str = Field(
        description="invalid_request_error, authentication_error, rate_limit_error or server_error."
    )
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(
        description="A stable code, e.g. model_not_found, invalid_value, queue_full, timeout."
    )


class OpenAIError(Schema):
    """OpenAI's error envelope: the official clients read `error` into their exceptions."""

    error: OpenAIErrorDetail
