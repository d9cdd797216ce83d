"""kiapi-echo: the smallest complete kiapi plugin, used by the tests and docs/plugins.md.

One capability (``text/echo``), one model, one operation (``POST /v1/text/echo/run``, declared
once: route, OpenAPI and job handler) that reports progress in steps, a hand-written route
with its OpenAPI fragment (``GET /v1/text/echo/models``), and a CLI command.
"""

from __future__ import annotations

import struct
import time
import zlib
from typing import Any, Literal

import click
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiapi_core import (
    Capability,
    JobContext,
    JobInputError,
    ModelSpec,
    Operation,
    WebhookEvents,
    WebhookUrl,
    hookimpl,
    host_of,
    require_model,
)

PREFIX = "/v1/text/echo"
CAPABILITY = Capability(
    name="echo", domain="text", title="Echo", description="Echoes text, in steps."
)


class EchoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=10_000, description="Text to echo back.")
    steps: int = Field(3, ge=1, le=1000, description="Progress steps to report.")
    delay_s: float = Field(0.01, ge=0, le=10, description="Pause per step, in seconds.")
    fail: bool = Field(False, description="Raise inside the handler (for tests).")
    pad_bytes: int = Field(
        0, ge=0, le=200_000_000, description="Add this many bytes to the result (for tests)."
    )
    hang_s: float = Field(
        0, ge=0, le=3600, description="Sleep this long after saving, never reporting (for tests)."
    )
    declare_eta: bool = Field(
        False, description="Report the seconds left (steps x delay) with each step (for tests)."
    )
    mode: Literal["sync", "async"] = Field(
        "sync", description="Wait for the result, or 202 at once."
    )
    model: str | None = Field(None, description="Model name or alias; default `echo-1`.")
    stamp: bool = Field(
        False, description="End each step's label with ` @<Unix time>` (for delivery lag)."
    )
    misbehave: Literal["nan_result", "nan_progress", "nan_detail"] | None = Field(
        None, description="Return or report what is not strict JSON (for tests)."
    )
    webhook: WebhookUrl = None
    webhook_events_filter: WebhookEvents = None
    preview_width: int = Field(
        0, ge=0, le=2048, description="Publish a live preview this wide at each step; 0 = none."
    )
    preview: bool | None = Field(None, description="false: no live previews for this job.")
    scratch_mb: int = Field(
        0,
        ge=0,
        le=1024,
        description="Allocate and free this much at each step, as a model's"
        " activations are (for tests).",
    )


class EchoResult(BaseModel):
    text: str
    steps: int
    file_id: str
    model: str
    pad: str | None = None


class EchoModel:
    def __call__(self, text: str) -> str:
        return text


def _load(weights_dir: Any, options: Any) -> EchoModel:
    return EchoModel()


SPEC = ModelSpec(
    name="echo-1",
    family="echo",
    domain="text",
    load=_load,
    aliases=("echo",),
    default=True,
    features=("text",),
    memory_gb=0.01,
)


def run_echo(ctx: JobContext) -> dict[str, Any]:
    params = ctx.params
    declare = params.get("declare_eta", False)
    steps, delay = params["steps"], params["delay_s"]
    ctx.progress(0.0, "loading", eta_s=steps * delay if declare else None)
    misbehave = params.get("misbehave")
    if misbehave == "nan_progress":
        ctx.progress(float("nan"), "lost count")
    if misbehave == "nan_detail":
        raise JobInputError("echo refuses this", detail={"score": float("inf")})
    with ctx.models.use(SPEC) as model:
        for step in range(params["steps"]):
            time.sleep(params["delay_s"])
            if params["fail"] and step == params["steps"] // 2:
                raise RuntimeError("echo was asked to fail")
            if params.get("scratch_mb"):
                scratch = [bytearray(2**20) for _ in range(params["scratch_mb"])]
                del scratch
            label = f"step {step + 1}/{steps}"
            if params.get("stamp"):
                label += f" @{time.time():.6f}"
            ctx.progress(
                (step + 1) / steps, label, eta_s=(steps - step - 1) * delay if declare else None
            )
            if params.get("preview_width") and ctx.wants_preview(step + 1):
                ctx.publish_preview(
                    _frame(params["preview_width"], step), step=step + 1, steps=steps
                )
        text = model(params["text"])
    ctx.progress(None, "saving")
    info = ctx.save_file(text.encode(), filename="echo.txt", content_type="text/plain")
    # A handler that ignores cancellation and deadlines: only the host can end it.
    time.sleep(params.get("hang_s", 0))
    result = {"text": text, "steps": params["steps"], "file_id": info.id, "model": SPEC.name}
    if params.get("pad_bytes"):
        result["pad"] = "x" * params["pad_bytes"]
    return {**result, "score": float("nan")} if misbehave == "nan_result" else result


def _frame(width: int, step: int) -> bytes:
    """A 4:3 PNG (made with the standard library: this plugin needs no Pillow) whose red
    channel counts the steps; the host re-encodes it as a small JPEG."""
    height = max(1, width * 3 // 4)  # a 1-pixel-wide frame is still an image
    row = b"\x00" + bytes(((step * 40) % 256, 128, 200)) * width
    body = zlib.compress(row * height)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def prepare(body: EchoRequest, request: Request) -> dict[str, Any]:
    spec = require_model(host_of(request).registry.models_for("echo"), body.model, "echo")
    # The test-only options appear in the params only when set, as before they existed.
    test_only = {
        "pad_bytes",
        "hang_s",
        "misbehave",
        "declare_eta",
        "preview_width",
        "preview",
        "stamp",
        "scratch_mb",
    }
    extras = body.model_dump(include=test_only, exclude_defaults=True)
    hidden = {"mode", "model", "webhook", "webhook_events_filter", *test_only}
    params = body.model_dump(exclude=hidden) | extras
    params["model"] = spec.name
    return params


async def models(request: Request) -> Response:
    return JSONResponse([SPEC.public()])


@hookimpl
def register_capabilities(register: Any) -> None:
    register(CAPABILITY)


@hookimpl
def register_models(register: Any) -> None:
    register(SPEC)


@hookimpl
def register_operations(register: Any) -> None:
    register(
        Operation(
            CAPABILITY,
            "run",
            EchoRequest,
            run_echo,
            result=EchoResult,
            media_types=["text/plain"],
            prepare=prepare,
            summary="Echo text back, as a job",
            responses={"400": "Unknown model."},
        )
    )


@hookimpl
def register_routes() -> list[Route]:
    return [Route(f"{PREFIX}/models", models, methods=["GET"])]


@hookimpl
def register_openapi() -> dict[str, Any]:
    return {
        "paths": {
            f"{PREFIX}/models": {
                "get": {
                    "summary": "Echo models",
                    "tags": ["echo"],
                    "responses": {
                        "200": {
                            "description": "The catalog.",
                            "content": {
                                "application/json": {
                                    "schema": {"type": "array", "items": {"type": "object"}}
                                }
                            },
                        }
                    },
                }
            },
        },
    }


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.command(name="echo")
    @click.argument("text")
    def echo_command(text: str) -> None:
        """Echo TEXT (from the kiapi-echo plugin)."""
        click.echo(text)
