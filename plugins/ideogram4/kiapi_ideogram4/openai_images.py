"""ideogram4's part in the host's OpenAI-compatible ``POST /v1/images/generations``.

The OpenAI fields are mapped onto a GenerateRequest, so the same validators and defaults apply
as on ``/v1/image/ideogram4/generate``, and the jobs are the very same ``ideogram4`` jobs.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from kiapi_core import ImageParamError, ImageRequest
from kiapi_ideogram4.routes import resolve_params
from kiapi_ideogram4.schemas import GenerateRequest
from kiapi_ideogram4.settings import get_settings

# OpenAI's quality levels as mflux presets; `auto` is the server's configured default.
QUALITY_PRESETS = {"low": "V4_TURBO_12", "medium": "V4_DEFAULT_20", "high": "V4_QUALITY_48"}
# Our field → the OpenAI request field a client has to change.
OPENAI_PARAM = {
    "width": "size",
    "height": "size",
    "format": "output_format",
    "quality": "output_compression",
}


def prepare(request: ImageRequest) -> list[dict[str, Any]]:
    fields: dict[str, Any] = {
        "prompt": request.prompt,
        "preset": QUALITY_PRESETS.get(request.quality, get_settings().default_preset),
        "format": request.output_format,
    }
    if request.width is not None and request.height is not None:
        fields["width"], fields["height"] = request.width, request.height
    if request.output_compression is not None:
        # OpenAI allows 0; Pillow's lowest useful quality is 1.
        fields["quality"] = max(1, request.output_compression)
    try:
        body = GenerateRequest.model_validate(fields)
    except ValidationError as exc:
        raise ImageParamError.from_validation(exc, OPENAI_PARAM) from None
    params = resolve_params(body, request.model)
    return [{**params, "seed": seed} for seed in request.seeds()]
