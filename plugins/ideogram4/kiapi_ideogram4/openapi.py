"""The capability's OpenAPI fragment, generated from its pydantic models."""

from __future__ import annotations

from typing import Any

from kiapi_core.jobs.schemas import AsyncJobResponse
from kiapi_core.web.openapi import error_response, json_response
from kiapi_core.web.schema import components_from, ref
from kiapi_ideogram4.routes import PREFIX
from kiapi_ideogram4.schemas import (
    CapabilityModelSpec,
    CaptionCheck,
    CaptionReport,
    GenerateRequest,
    JobImageResponse,
)
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


def _binary() -> dict[str, Any]:
    return {"schema": {"type": "string", "format": "binary"}}


def fragment() -> dict[str, Any]:
    schemas = components_from(
        GenerateRequest,
        JobImageResponse,
        AsyncJobResponse,
        CapabilityModelSpec,
        CaptionCheck,
        CaptionReport,
    )
    # The documented default follows the server's configured default preset.
    schemas["GenerateRequest"]["properties"]["preset"]["default"] = get_settings().default_preset
    accept_doc = (
        "Preferred response type: application/json returns the Job JSON; otherwise a sync "
        "request answers with the image bytes."
    )
    return {
        "paths": {
            f"{PREFIX}/generate": {
                "post": {
                    "summary": "Generate",
                    "description": GENERATE_DOC,
                    "operationId": "generate_v1_image_ideogram4_generate_post",
                    "tags": ["ideogram4"],
                    "parameters": [
                        {
                            "name": "Accept",
                            "in": "header",
                            "required": False,
                            "schema": {
                                "anyOf": [{"type": "string"}, {"type": "null"}],
                                "title": "Accept",
                                "description": accept_doc,
                                "examples": ["application/json", "image/png", "image/*"],
                            },
                            "description": accept_doc,
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref(GenerateRequest)}},
                    },
                    "responses": {
                        "200": {
                            "description": "Sync result: the image bytes, or the Job JSON with Accept: application/json.",
                            "content": {
                                "application/json": {"schema": ref(JobImageResponse)},
                                "image/png": _binary(),
                                "image/jpeg": _binary(),
                                "image/webp": _binary(),
                            },
                            "headers": {
                                "X-Kiapi-File-Id": {
                                    "description": "The image's file id (raw-bytes answers).",
                                    "schema": {"type": "string"},
                                },
                                "X-Kiapi-Job-Id": {
                                    "description": "The job's id (raw-bytes answers).",
                                    "schema": {"type": "string"},
                                },
                            },
                        },
                        "202": json_response(
                            ref(AsyncJobResponse), "Async: accepted; poll GET /v1/jobs/{job_id}."
                        ),
                        "400": {
                            "description": "Unknown model (valid names listed), or caption issues with strict_caption_validation.",
                            "content": {"application/json": {"schema": ref("Error")}},
                        },
                        "406": error_response(
                            "Accept allows neither the image type nor application/json."
                        ),
                        "409": error_response("The job was canceled while the request waited."),
                        "413": error_response("Body larger than KIAPI_MAX_BODY_BYTES."),
                        "415": error_response("Body is not application/json."),
                        "422": {
                            "description": "A field failed validation; `detail` names each field and rule.",
                            "content": {"application/json": {"schema": ref("Error")}},
                        },
                        "429": error_response("Queue full (KIAPI_MAX_QUEUE); see Retry-After."),
                        "500": error_response("The generation failed; the job's error says why."),
                        "503": {
                            "description": "Weights not activated (the fixing command is named) or over the memory budget.",
                            "content": {"application/json": {"schema": ref("Error")}},
                        },
                        "504": {
                            "description": "Sync wait exceeded KIAPI_SYNC_TIMEOUT_S; the body names the job id, which keeps running.",
                            "content": {"application/json": {"schema": ref("Error")}},
                        },
                    },
                }
            },
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
