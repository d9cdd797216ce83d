"""zimage's part in the host's OpenAI-compatible ``POST /v1/images/generations``.

The OpenAI fields are mapped onto a ZImageGenerateRequest, so the same validators and defaults
apply as on ``/v1/image/zimage/generate``, and the jobs are the very same ``zimage`` jobs.
"""

from __future__ import annotations

import secrets
from typing import Any

from pydantic import ValidationError

from kiapi_core import ImageParamError, ImageRequest
from kiapi_zimage.routes import resolve_params
from kiapi_zimage.schemas import SEED_LIMIT, ZImageGenerateRequest

# OpenAI's quality levels as step counts; `auto` is the server's configured default.
QUALITY_STEPS = {"low": 4, "medium": 9, "high": 16}
# Our field -> the OpenAI request field a client has to change.
OPENAI_PARAM = {
    "width": "size",
    "height": "size",
    "format": "output_format",
    "quality": "output_compression",
}


def _seeds(first: int | None, n: int) -> list[int]:
    """``n`` distinct seeds: first, first+1, ... when one is given, else drawn at random."""
    if first is not None:
        if first + n > SEED_LIMIT:
            raise ImageParamError("seed", f"seed + n - 1 must stay below 2**64 (got seed={first})")
        return [first + i for i in range(n)]
    seeds: list[int] = []
    while len(seeds) < n:
        seed = secrets.randbelow(2**32)
        if seed not in seeds:
            seeds.append(seed)
    return seeds


def _refusal(exc: ValidationError) -> ImageParamError:
    err = exc.errors(include_url=False)[0]
    field = str(err["loc"][0]) if err["loc"] else "prompt"
    message = str(err["msg"]).removeprefix("Value error, ")
    param = OPENAI_PARAM.get(field, field)
    return ImageParamError(
        param, f"{param}: {field} {message}" if param != field else f"{field}: {message}"
    )


def prepare(request: ImageRequest) -> list[dict[str, Any]]:
    fields: dict[str, Any] = {"prompt": request.prompt, "format": request.output_format}
    if request.quality in QUALITY_STEPS:
        fields["steps"] = QUALITY_STEPS[request.quality]
    if request.width is not None and request.height is not None:
        fields["width"], fields["height"] = request.width, request.height
    if request.output_compression is not None:
        # OpenAI allows 0; Pillow's lowest useful quality is 1.
        fields["quality"] = max(1, request.output_compression)
    try:
        body = ZImageGenerateRequest.model_validate(fields)
    except ValidationError as exc:
        raise _refusal(exc) from None
    params = resolve_params(body, request.model)
    return [{**params, "seed": seed} for seed in _seeds(request.seed, request.n)]
