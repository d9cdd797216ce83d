"""The capability's OpenAPI: the generate operation's wording and overrides (the path item
itself is generated from its Operation), and the fragment of the hand-written routes."""

from __future__ import annotations

from typing import Any

from kiapi_core import components_from, error_response, json_response, ref
from kiapi_ideogram4.routes import PREFIX
from kiapi_ideogram4.schemas import CapabilityModelSpec, CaptionCheck, CaptionReport
from kiapi_ideogram4.settings import get_settings

GENERATE_DOC = """Generate one image from a JSON caption or plain text (Ideogram 4 through mflux).

Runs as a job. With `mode=sync` (default) the call waits: unless `Accept` prefers
`application/json`, the answer is the image itself with its Content-Type plus `X-Kiapi-File-Id`
and `X-Kiapi-Job-Id` (`curl -o out.png` works); with `Accept: application/json` it is the Job
JSON whose `result` is an ImageResponse. `mode=async` answers 202 at once: poll
`GET /v1/jobs/{job_id}` (or follow `/events`) and download `GET /v1/files/{file_id}/download`.

Caption bboxes are `[y_min, x_min, y_max, x_max]` integers in 0..1000 (what mflux verifies).
A `quantize` other than the resident model's runs a one-off transient model. An
'Image blocked by safety filter' picture is stored as the result, not an error."""


# Where the generated standard error descriptions say too little for this capability.
GENERATE_RESPONSES: dict[str, str | dict[str, Any]] = {
    "400": "Unknown model (valid names listed), or caption issues with strict_caption_validation.",
    "406": "Accept allows neither the image type nor application/json.",
    "500": "The generation failed; the job's error says why.",
    "503": "Weights not activated (the fixing command is named) or over the memory budget.",
}


def generate_schema_overrides() -> dict[str, dict[str, Any]]:
    # The documented default follows the server's configured default preset.
    return {
        "GenerateRequest": {"properties": {"preset": {"default": get_settings().default_preset}}}
    }


def fragment() -> dict[str, Any]:
    """GET /models and POST /validate, the routes written by hand."""
    schemas = components_from(CapabilityModelSpec, CaptionCheck, CaptionReport)
    return {
        "paths": {
            f"{PREFIX}/models": {
                "get": {
                    "summary": "List Models",
                    "description": "The models selectable through the `model` field of this capability.",
                    "operationId": "list_models_v1_image_ideogram4_models_get",
                    "tags": ["ideogram4"],
                    "responses": {
                        "200": {
                            "description": "The catalog.",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "items": ref(CapabilityModelSpec),
                                        "type": "array",
                                        "title": "Response List Models V1 Image Ideogram4 Models Get",
                                    }
                                }
                            },
                        }
                    },
                }
            },
            f"{PREFIX}/validate": {
                "post": {
                    "summary": "Check a caption",
                    "description": "mflux's caption-schema warnings for a prompt, without generating (cheap).",
                    "operationId": "validate_v1_image_ideogram4_validate_post",
                    "tags": ["ideogram4"],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref(CaptionCheck)}},
                    },
                    "responses": {
                        "200": json_response(ref(CaptionReport), "The verifier's report."),
                        "413": error_response("Body too large."),
                        "415": error_response("Body is not application/json."),
                        "422": error_response("Invalid body."),
                    },
                }
            },
        },
        "components": {"schemas": schemas},
    }
