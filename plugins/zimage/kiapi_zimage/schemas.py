"""Request and response models of the zimage capability: the source of its OpenAPI.

Every rule mflux applies to a Z-Image request is checked here, so a bad value is a 422 naming
the field instead of something mflux silently changes or fails on after the model loaded:
sides are multiples of 16 (mflux rounds others down with only a log line), steps at least 1,
the seed an unsigned 64-bit integer (``mx.random.key``), quantize one of mflux's bit widths.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, Strict, field_validator

from kiapi_core import KeepAlive, Previews, Schema, WebhookEvents, WebhookUrl, optional

MIN_SIDE, MAX_SIDE, SIDE_STEP = 64, 2048, 16
MAX_STEPS = 50
QUANTIZE_BITS = (3, 4, 5, 6, 8)
SEED_LIMIT = 2**64
# mflux pads and truncates the prompt to 512 tokens; this only keeps megabytes out of the queue.
MAX_PROMPT_CHARS = 8192
StrictInt = Annotated[int, Strict()]

SIDE_DOC = (
    f"Pixels; a multiple of {SIDE_STEP} within {MIN_SIDE}..{MAX_SIDE}. Omit for the server "
    "default (1024)."
)


class ZImageGenerateRequest(Schema):
    """One text-to-image request. Unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = optional(
        "Model name or alias (`turbo`, `zimage`, `z-image`, `z-image-turbo`); omit for `turbo`."
    )
    mode: Literal["sync", "async"] = Field(
        "sync",
        description="`sync` waits for the image (504 past the server's timeout); `async` answers 202 with a job id.",
    )
    webhook: WebhookUrl = None
    webhook_events_filter: WebhookEvents = None
    prompt: str = Field(
        description="What to draw, in plain text. Z-Image reads at most 512 tokens of it (the rest is dropped). Must not be empty."
    )
    steps: StrictInt | None = optional(
        f"Denoising steps, 1..{MAX_STEPS}. Omit for the server default (9, mflux's for Z-Image Turbo)."
    )
    width: StrictInt | None = optional(SIDE_DOC)
    height: StrictInt | None = optional(SIDE_DOC)
    seed: StrictInt | None = optional(
        "Seed for reproducible output, 0..2**64-1; omit to draw one (recorded in the result's `params`)."
    )
    quantize: StrictInt | None = optional(
        "Bits: 3, 4, 5, 6 or 8. Omit to use the resident model; a different value runs a one-off transient model."
    )
    keep_alive: KeepAlive = None
    format: Literal["png", "jpeg", "webp"] = Field(
        "png", description="Encoding of the produced image file."
    )
    quality: StrictInt = Field(
        90, ge=1, le=100, description="Encoder quality for jpeg and webp (png is lossless)."
    )
    preview: Previews = True

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty or blank")
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        return value

    @field_validator("width", "height")
    @classmethod
    def _side(cls, value: int | None) -> int | None:
        if value is None:
            return value
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise ValueError(f"must be within {MIN_SIDE}..{MAX_SIDE} (got {value})")
        if value % SIDE_STEP:
            raise ValueError(
                f"must be a multiple of {SIDE_STEP} (got {value}; mflux would round it down)"
            )
        return value

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= MAX_STEPS:
            raise ValueError(f"must be within 1..{MAX_STEPS} (got {value})")
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
        if value is not None and not 0 <= value < SEED_LIMIT:
            raise ValueError("must be within 0..18446744073709551615 (an unsigned 64-bit integer)")
        return value


class ZImageTimings(Schema):
    total_s: float = Field(
        description="Seconds the model spent generating (load, queue and encode excluded)."
    )


class ZImageResponse(Schema):
    """The `result` of a succeeded zimage job."""

    model: str = Field(description="The model that ran (`turbo`).")
    prompt: str = Field(description="The prompt as given.")
    file_id: str = Field(
        description="The image in the files API (also the raw bytes of a sync call)."
    )
    image_bytes: int = Field(description="Size of the encoded image in bytes.")
    width: int = Field(description="Width of the image in pixels.")
    height: int = Field(description="Height of the image in pixels.")
    params: dict[str, object] = Field(
        description="Every resolved parameter (model, prompt, steps, seed, width, height, quantize, format, quality), to reproduce the run."
    )
    timings: ZImageTimings = Field(description="Server-side timing.")


class ZImageModelSpec(Schema):
    """A model selectable through the `model` field."""

    name: str = Field(description="Name to pass as `model`.")
    family: str = Field(description="Capability that serves it.")
    domain: str = Field(description="Capability domain.")
    aliases: list[str] = Field(default_factory=list, description="Other names accepted for it.")
    default: bool = Field(False, description="Used when a request names no model.")
    features: list[str] = Field(default_factory=list, description="What it takes and produces.")
