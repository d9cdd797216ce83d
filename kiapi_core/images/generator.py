"""What a plugin registers to fulfil ``POST /v1/images/generations`` for its models."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kiapi_core.models.spec import ModelSpec

Quality = Literal["low", "medium", "high", "auto"]
OutputFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True)
class ImageRequest:
    """An OpenAI-style request the host has parsed and checked, for the generator of ``model``.

    ``width``/``height`` are None for ``size: "auto"`` (or no size): the capability's default.
    ``quality`` is already folded to low/medium/high/auto (DALL-E's standard/hd map to
    medium/high). ``extra`` holds the fields the host does not know, so a plugin may offer
    its own extensions; the host itself ignores them.
    """

    prompt: str
    model: ModelSpec
    n: int
    width: int | None
    height: int | None
    quality: Quality
    output_format: OutputFormat
    output_compression: int | None
    seed: int | None
    extra: Mapping[str, Any] = field(default_factory=dict)


class ImageParamError(ValueError):
    """Raised by ``prepare`` for a value the capability cannot take; the client gets a 400
    ``invalid_request_error`` naming ``param`` (an OpenAI request field, e.g. ``size``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class ImageGenerator:
    """Fulfils image requests for the models of ``family`` by running ``job_type`` jobs.

    ``prepare(request)`` turns one request into the params of ``request.n`` jobs, one per
    image, with distinct seeds; it runs on the event loop, so it must be quick and must not
    load a model. It raises :class:`ImageParamError` for values the capability refuses. Each
    job must leave exactly one artifact: the encoded image.
    """

    family: str
    job_type: str
    prepare: Callable[[ImageRequest], list[dict[str, Any]]]
