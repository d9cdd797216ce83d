"""Request and response models of the ideogram4 capability: the source of its OpenAPI.

Field names, types, enums, defaults, bounds and required lists follow the promised contract
exactly; rules the contract states in prose (multiples of 16, quantize bits, non-empty prompt)
are enforced by validators so the schema itself stays unchanged.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, Strict, field_validator

from kiapi_core import (
    JsonRefused,
    KeepAlive,
    Previews,
    Schema,
    WebhookEvents,
    WebhookUrl,
    optional,
    parse_json_text,
)

MIN_SIDE, MAX_SIDE, SIDE_STEP = 256, 2048, 16
QUANTIZE_BITS = (3, 4, 5, 6, 8)
# Far beyond any useful caption; keeps a runaway client from queueing megabytes of prompt.
MAX_PROMPT_CHARS = 32_768
StrictInt = Annotated[int, Strict()]
# The schema says boolean: "yes", 0 or "false" are refused rather than guessed at.
StrictBool = Annotated[bool, Strict()]

PROMPT_DOC = (
    "What to draw: a JSON caption object (preferred: `high_level_description`, optional "
    "`style_description`, `compositional_deconstruction` with `background` and `elements`, each "
    "element `type` text|obj, `bbox` as `[y_min, x_min, y_max, x_max]` integers in 0..1000 — the "
    "order mflux checks — `text` for text elements, and `desc`), or plain text (weaker for "
    "lettering). Must not be empty."
)
SIDE_DOC = "Pixels; a multiple of 16 within 256..2048. Omit for the server default (1024)."


def check_prompt(value: str | dict[str, Any]) -> str | dict[str, Any]:
    """The length limit, and for a caption given as a JSON string the body's JSON rules.

    mflux parses a string that starts with ``{`` with Python's recursive json: a caption
    nested thousands deep would end in RecursionError, so it is refused here, as it would be
    in the body itself.
    """
    if isinstance(value, str):
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        if value.lstrip().startswith("{"):
            try:
                parse_json_text(value.strip())
            except JsonRefused as exc:
                raise ValueError(f"the JSON caption in this string is refused: {exc}") from None
    elif len(json.dumps(value)) > MAX_PROMPT_CHARS:
        raise ValueError(f"caption is longer than {MAX_PROMPT_CHARS} characters as JSON")
    return value


class GenerateRequest(Schema):
    """One text-to-image request. Unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = optional(
        "Model name or alias (`fp8`, `ideogram4`, `ideogram-4`); omit for `fp8`."
    )
    mode: Literal["sync", "async"] = Field(
        "sync",
        description="`sync` waits for the image (504 past the server's timeout); `async` answers 202 with a job id.",
    )
    webhook: WebhookUrl = None
    webhook_events_filter: WebhookEvents = None
    prompt: str | dict[str, Any] = Field(description=PROMPT_DOC)
    preset: Literal["V4_DEFAULT_20", "V4_QUALITY_48", "V4_TURBO_12"] = Field(
        "V4_DEFAULT_20",
        description="mflux sampler preset: `V4_TURBO_12` (12 steps, fastest), `V4_DEFAULT_20` (balanced), `V4_QUALITY_48` (48 steps, best).",
    )
    width: StrictInt | None = optional(SIDE_DOC)
    height: StrictInt | None = optional(SIDE_DOC)
    seed: StrictInt | None = optional(
        "Seed for reproducible output; omit to draw one (recorded in the result's `params`)."
    )
    quantize: StrictInt | None = optional(
        "Bits: 3, 4, 5, 6 or 8. Omit to use the resident model; a different value runs a one-off transient model."
    )
    keep_alive: KeepAlive = None
    strict_caption_validation: StrictBool = Field(
        False,
        description="Refuse (400) a prompt for which mflux's caption verifier reports issues.",
    )
    warn_on_caption_issues: StrictBool = Field(
        True, description="Report mflux's caption issues in the result (`caption_warnings`)."
    )
    format: Literal["png", "jpeg", "webp"] = Field(
        "png", description="Encoding of the produced image file."
    )
    quality: StrictInt = Field(
        90, ge=1, le=100, description="Encoder quality for jpeg and webp (png is lossless)."
    )
    preview: Previews = True

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        if isinstance(value, str) and not value.strip():
            raise ValueError("prompt must not be empty or blank")
        if isinstance(value, dict) and not value:
            raise ValueError(
                "caption object must not be empty; give at least high_level_description"
            )
        return check_prompt(value)

    @field_validator("width", "height")
    @classmethod
    def _side(cls, value: int | None) -> int | None:
        if value is None:
            return value
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise ValueError(f"must be within {MIN_SIDE}..{MAX_SIDE} (got {value})")
        if value % SIDE_STEP:
            raise ValueError(f"must be a multiple of {SIDE_STEP} (got {value})")
        return value

    @field_validator("quantize")
    @classmethod
    def _bits(cls, value: int | None) -> int | None:
        if value is not None and value not in QUANTIZE_BITS:
            raise ValueError(f"must be one of {', '.join(map(str, QUANTIZE_BITS))} (got {value})")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value < 2**64:
            raise ValueError("must be within 0..18446744073709551615 (an unsigned 64-bit integer)")
        return value


class _Timings(Schema):
    total_s: float = Field(
        description="Seconds the model spent generating (load, queue and encode excluded)."
    )


class ImageResponse(Schema):
    """The `result` of a succeeded ideogram4 job."""

    model: str = Field(description="The model that ran (`fp8`).")
    prompt: str | dict[str, Any] = Field(description="The prompt as given.")
    file_id: str = Field(
        description="The image in the files API (also the raw bytes of a sync call)."
    )
    image_bytes: int = Field(description="Size of the encoded image in bytes.")
    width: int = Field(description="Width of the image in pixels.")
    height: int = Field(description="Height of the image in pixels.")
    params: dict[str, Any] = Field(
        description="Every resolved parameter (model, prompt, preset, steps, seed, width, height, quantize, format, quality...), to reproduce the run."
    )
    safety_filter_note: str = Field(
        description="Ideogram 4 may return an 'Image blocked by safety filter' picture (false positives included); it is stored as the result, not raised as an error."
    )
    timings: _Timings = Field(description="kiapi extension: server-side timing.")
    caption_warnings: list[str] = Field(
        default_factory=list,
        description="kiapi extension: mflux's caption-schema issues for this prompt (empty when warn_on_caption_issues is false).",
    )


class CapabilityModelSpec(Schema):
    """A model selectable through the `model` field."""

    name: str = Field(description="Name to pass as `model`.")
    family: str = Field(description="Capability that serves it.")
    domain: str = Field(description="Capability domain.")
    aliases: list[str] = Field(default_factory=list, description="Other names accepted for it.")
    default: bool = Field(False, description="Used when a request names no model.")
    features: list[str] = Field(default_factory=list, description="What it takes and produces.")


class CaptionCheck(Schema):
    """kiapi extension: POST /v1/image/ideogram4/validate."""

    prompt: str | dict[str, Any] = Field(description=PROMPT_DOC)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        return check_prompt(value)


class CaptionReport(Schema):
    valid: bool = Field(description="True when mflux reports no caption issue.")
    is_json_caption: bool = Field(description="Whether the prompt is used as a JSON caption.")
    warnings: list[str] = Field(description="mflux's caption-schema issues.")


SAFETY_FILTER_NOTE = (
    "Ideogram 4 may return an 'Image blocked by safety filter' image, false positives included; "
    "kiapi stores it as the artifact rather than raising an error."
)
