"""What a plugin registers to fulfil ``POST /v1/images/generations`` for its models."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from kiapi_core.models.spec import ModelSpec

if TYPE_CHECKING:
    from pydantic import ValidationError

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

    def seeds(self, limit: int = 2**64) -> list[int]:
        """``n`` distinct seeds, one per image: ``seed``, ``seed + 1``, ... when the request
        gives one (ImageParamError unless all stay below ``limit``), else drawn at random."""
        first, n = self.seed, self.n
        if first is not None:
            if first + n > limit:
                power = limit & (limit - 1) == 0  # said as 2**64, as the field's rule says it
                bound = f"2**{limit.bit_length() - 1}" if power else str(limit)
                raise ImageParamError(
                    "seed", f"seed + n - 1 must stay below {bound} (got seed={first})"
                )
            return [first + i for i in range(n)]
        seeds: list[int] = []
        while len(seeds) < n:
            seed = secrets.randbelow(min(limit, 2**32))
            if seed not in seeds:
                seeds.append(seed)
        return seeds


class ImageParamError(ValueError):
    """Raised by ``prepare`` for a value the capability cannot take; the client gets a 400
    ``invalid_request_error`` naming ``param`` (an OpenAI request field, e.g. ``size``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message

    @classmethod
    def from_validation(cls, exc: ValidationError, params: Mapping[str, str]) -> ImageParamError:
        """The first error of validating the capability's own request model, named as the
        OpenAI field a client has to change (``params``: our field -> theirs, e.g.
        ``{"width": "size"}``; a field not in it keeps its name)."""
        err = exc.errors(include_url=False)[0]
        ours = str(err["loc"][0]) if err["loc"] else "prompt"
        message = str(err["msg"]).removeprefix("Value error, ")
        param = params.get(ours, ours)
        return cls(param, f"{param}: {ours} {message}" if param != ours else f"{ours}: {message}")


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
