"""zimage's part in the host's OpenAI-compatible ``POST /v1/images/generations``.

The OpenAI fields are mapped onto a ZImageGenerateRequest, so the same validators and defaults
apply as on ``/v1/image/zimage/generate``, and the jobs are the very same ``zimage`` jobs.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from kiapi_core import ImageParamError, ImageRequest
from kiapi_zimage.routes import resolve_params
from kiapi_zimage.schemas import ZImageGenerateRequest

# OpenAI's quality levels as step counts; `auto` is the server's configured default.
QUALITY_STEPS = {"low": 4, "medium": 9, "high": 16}
# Our field -> the OpenAI request field a client has to change.
OPENAI_PARAM = {
    "width": "size",
    "height": "size",
    "format": "output_format",
    "quality": "output_compression",
}


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
        raise ImageParamError.from_validation(exc, OPENAI_PARAM) from None
    params = resolve_params(body, request.model)
    return [{**params, "seed": seed} for seed in request.seeds()]
