"""The OpenAPI of ``POST /v1/images/generations``, generated from the pydantic models."""

from __future__ import annotations

from typing import Any

from kiapi_core.images.routes import PATH
from kiapi_core.images.schemas import ImageGenerationRequest, ImagesResponse, OpenAIError
from kiapi_core.jobs.submit import SUBMIT_PARAMS
from kiapi_core.web.openapi import json_response
from kiapi_core.web.schema import components_from, ref

DESCRIPTION = """OpenAI's Images API (`client.images.generate(...)` of the official clients works
with `base_url` set to this server's `/v1`). The host picks the capability by `model` (see
`GET /v1/models`), runs one job per image (`n`), waits for them, and answers in OpenAI's shapes,
errors included (`{"error": {message, type, param, code}}`).

The jobs are ordinary kiapi jobs (`kiapi_job_ids`): they show up in `GET /v1/jobs`, and their
images stay in the files API. If an image fails or the wait exceeds KIAPI_SYNC_TIMEOUT_S, the
request's remaining jobs are canceled (an OpenAI client cannot come back for them).

kiapi's submit headers apply (docs/jobs.md): with `Idempotency-Key` image `i` is the job of key
`KEY#i`, so a repeat finds every image's job (`Idempotent-Replayed: true`); `Cancel-After` and
`X-Kiapi-Priority` apply to each image's job."""


def _error(description: str) -> dict[str, Any]:
    return json_response(ref(OpenAIError), description)


def fragment() -> dict[str, Any]:
    return {
        "paths": {
            PATH: {
                "post": {
                    "summary": "Create images (OpenAI-compatible)",
                    "description": DESCRIPTION,
                    "operationId": "create_images",
                    "tags": ["images"],
                    # Prefer does not apply: an OpenAI client always waits for its images.
                    "parameters": [p for n, p in SUBMIT_PARAMS.items() if n != "Prefer"],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref(ImageGenerationRequest)}},
                    },
                    "responses": {
                        "200": {
                            "description": "The images, in request order.",
                            "content": {"application/json": {"schema": ref(ImagesResponse)}},
                        },
                        "400": _error(
                            "A field is invalid (`param` names it), or the capability refused a"
                            " value (e.g. a size outside its bounds)."
                        ),
                        "404": _error(
                            "No such model (`code: model_not_found`); the message lists them."
                        ),
                        "409": _error(
                            "A job was canceled (e.g. DELETE /v1/jobs/{id}) while waiting."
                        ),
                        # The host's body limit answers before this route, in the host's shape.
                        "413": {
                            "description": "Body larger than KIAPI_MAX_BODY_BYTES.",
                            "content": {"application/json": {"schema": ref("Error")}},
                        },
                        "415": _error("Body is not application/json."),
                        "429": _error(
                            "Not enough room in the queue for all `n` jobs; see Retry-After."
                        ),
                        "500": _error("A generation failed; the message says why."),
                        "503": _error(
                            "The model's weights are not activated (the fixing command is named),"
                            " or it does not fit the memory budget."
                        ),
                        "504": _error(
                            "Not ready within KIAPI_SYNC_TIMEOUT_S; the jobs were canceled."
                        ),
                    },
                }
            }
        },
        "components": {
            "schemas": components_from(ImageGenerationRequest, ImagesResponse, OpenAIError)
        },
        "tags": [{"name": "images", "description": "OpenAI-compatible image generation."}],
    }
