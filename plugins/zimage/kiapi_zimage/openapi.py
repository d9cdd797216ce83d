"""The capability's OpenAPI: the generate operation's wording (its path item is generated from
its Operation), and the fragment of the hand-written GET /models."""

from __future__ import annotations

from typing import Any

from kiapi_core import components_from, ref
from kiapi_zimage.routes import PREFIX
from kiapi_zimage.schemas import ZImageModelSpec
from kiapi_zimage.settings import get_settings

GENERATE_DOC = """Generate one image from a text prompt (Z-Image Turbo through mflux).

Runs as a job. With `mode=sync` (default) the call waits: unless `Accept` prefers
`application/json`, the answer is the image itself with its Content-Type plus `X-Kiapi-File-Id`
and `X-Kiapi-Job-Id` (`curl -o out.png` works); with `Accept: application/json` it is the Job
JSON whose `result` is an ZImageResponse. `mode=async` answers 202 at once: poll
`GET /v1/jobs/{job_id}` (or follow `/events`) and download `GET /v1/files/{file_id}/download`.

Z-Image Turbo is guidance-distilled: there is no guidance or negative prompt. A `quantize`
other than the resident model's runs a one-off transient model."""

GENERATE_RESPONSES: dict[str, str | dict[str, Any]] = {
    "400": "Unknown model (valid names listed).",
    "406": "Accept allows neither the image type nor application/json.",
    "500": "The generation failed; the job's error says why.",
    "503": "Weights not activated (the fixing command is named) or over the memory budget.",
}


def generate_schema_overrides() -> dict[str, dict[str, Any]]:
    # The documented defaults follow the server's configuration.
    settings = get_settings()
    return {
        "ZImageGenerateRequest": {
            "properties": {
                "steps": {"default": settings.default_steps},
                "width": {"default": settings.default_width},
                "height": {"default": settings.default_height},
            }
        }
    }


def fragment() -> dict[str, Any]:
    """GET /models, the route written by hand."""
    return {
        "paths": {
            f"{PREFIX}/models": {
                "get": {
                    "summary": "List Models",
                    "description": "The models selectable through the `model` field of this capability.",
                    "operationId": "list_models_v1_image_zimage_models_get",
                    "tags": ["zimage"],
                    "responses": {
                        "200": {
                            "description": "The catalog.",
                            "content": {
                                "application/json": {
                                    "schema": {"items": ref(ZImageModelSpec), "type": "array"}
                                }
                            },
                        }
                    },
                }
            }
        },
        "components": {"schemas": components_from(ZImageModelSpec)},
    }
