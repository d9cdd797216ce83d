"""The zimage job handler: runs mflux on a worker thread with honest, cancelable progress.

Progress is split into phases whose shares come from measured durations: the denoising steps
(mflux's per-step callback; the prompt is encoded lazily, so step 1 also pays for the text
encoder), the VAE decode (no callback: a ticker advances it by the expected duration, never past
its share) and saving. The fraction stays below 1.0 until the image is decoded and stored; the
host alone sets 1.0 when the job succeeds.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from kiapi_core import (
    IMAGE_EXTENSIONS,
    IMAGE_MEDIA_TYPES,
    JobContext,
    PhaseClock,
    StepProgress,
    encode_image,
    phase_clock,
)
from kiapi_zimage.catalog import TURBO
from kiapi_zimage.preview import LatentPreviews
from kiapi_zimage.schemas import ZImageResponse
from kiapi_zimage.settings import get_settings

START_SHARE = 0.02
SAVE_SHARE = 0.03


def clock_for(ctx: JobContext) -> PhaseClock:
    """The phase clock in this plugin's data directory (the decode taken as 2 steps long
    until measured)."""
    return phase_clock(ctx, decode_steps=2.0)


# MLX gains nothing from two generations side by side on one device, and mx.compile'd
# predict functions are not meant to run concurrently.
GENERATE_LOCK = threading.Lock()


class Progress(StepProgress):
    """mflux callback object (duck-typed) feeding the shared phase model (kiapi_core)."""

    def __init__(self, ctx: JobContext, steps: int, pixels: int) -> None:
        super().__init__(
            ctx,
            clock_for(ctx),
            steps=steps,
            pixels=pixels,
            start_share=START_SHARE,
            save_share=SAVE_SHARE,
            name="kiapi-zimage-decode-progress",
        )

    def call_before_loop(self, **_: Any) -> None:
        self.start()

    def call_in_loop(self, t: int, **_: Any) -> None:
        # Called after step t was queued; mlx evaluates it right after, so steps 0..t-1 are
        # done. Raising here (ctx.progress does on cancel) stops the run; the model stays usable.
        self.step(t)

    def call_after_loop(self, **_: Any) -> None:
        self.decoding()


def _detach(model: Any, callback: object) -> None:
    registry = model.callbacks
    for name in ("before_loop", "in_loop", "after_loop", "interrupt"):
        items = getattr(registry, name, None)
        if items is not None and callback in items:
            items.remove(callback)


def generate(ctx: JobContext) -> dict[str, Any]:
    p = ctx.params
    transient = p["quantize"] != get_settings().quantize
    options = {"quantize": p["quantize"]} if transient else {}
    ctx.progress(0.0, "loading")
    with ctx.models.use(TURBO, options, transient=transient) as model:
        previews = LatentPreviews(ctx, p["steps"], p["width"], p["height"])
        ctx.progress(0.01, "encoding prompt")
        with GENERATE_LOCK:
            # Made here: its lead-in is timed from the start of this generation.
            progress = Progress(ctx, p["steps"], p["width"] * p["height"])
            model.callbacks.register(progress)
            model.callbacks.register(previews)  # after progress: a cancel stops it first
            started = time.monotonic()
            try:
                generated = model.generate_image(
                    seed=p["seed"],
                    prompt=p["prompt"],
                    num_inference_steps=p["steps"],
                    width=p["width"],
                    height=p["height"],
                )
            finally:
                progress.finish()
                _detach(model, progress)
                _detach(model, previews)
        total_s = time.monotonic() - started
        image = generated.image
    ctx.progress(1.0 - SAVE_SHARE, "saving")
    data = encode_image(image, p["format"], p["quality"])
    info = ctx.save_file(
        data,
        filename=f"zimage-{p['seed']}.{IMAGE_EXTENSIONS[p['format']]}",
        content_type=IMAGE_MEDIA_TYPES[p["format"]],
    )
    result = ZImageResponse(
        model=p["model"],
        prompt=p["prompt"],
        file_id=info.id,
        image_bytes=info.bytes,
        width=image.width,
        height=image.height,
        params=dict(p),
        timings={"total_s": round(total_s, 3)},
    )
    return result.model_dump(mode="json")
