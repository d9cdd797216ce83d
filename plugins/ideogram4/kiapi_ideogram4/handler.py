"""The ideogram4 job handler: runs mflux on a worker thread with honest, cancelable progress.

Progress is split into phases whose shares come from measured durations: prompt encoding,
the denoising steps (reported by mflux's per-step callback), the VAE decode (no callback: a
ticker advances it by the expected duration, never past its share) and saving. On CPU the
decode takes about as long as all the steps, so the fraction stays well below 1.0 until the
image is decoded and stored; the host alone sets 1.0 when the job succeeds.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from kiapi_core import (
    IMAGE_EXTENSIONS,
    IMAGE_MEDIA_TYPES,
    JobContext,
    JobInputError,
    PhaseClock,
    StepProgress,
    encode_image,
    phase_clock,
)
from kiapi_ideogram4.catalog import FP8
from kiapi_ideogram4.preview import LatentPreviews
from kiapi_ideogram4.schemas import SAFETY_FILTER_NOTE, ImageResponse
from kiapi_ideogram4.settings import get_settings

# Shares of the whole job, before any run has been measured.
ENCODE_SHARE = 0.04
SAVE_SHARE = 0.03


def clock_for(ctx: JobContext) -> PhaseClock:
    """The phase clock in this plugin's data directory. Until measured, the decode is taken
    as 20 steps long (the tiny test checkpoint decodes for ~150 steps' worth, the real model
    on CPU for about one preset's worth)."""
    return phase_clock(ctx, decode_steps=20.0)


# mflux seeds its noise through mlx's global RNG (mx.random.seed), so two generations at once
# in one process would race on it and lose per-seed determinism; MLX gains nothing from
# running them side by side on one device anyway.
GENERATE_LOCK = threading.Lock()


class Progress(StepProgress):
    """mflux callback object (duck-typed) feeding the shared phase model (kiapi_core)."""

    def __init__(self, ctx: JobContext, steps: int, pixels: int) -> None:
        super().__init__(
            ctx,
            clock_for(ctx),
            steps=steps,
            pixels=pixels,
            start_share=ENCODE_SHARE,
            save_share=SAVE_SHARE,
            name="kiapi-ideogram4-decode-progress",
        )

    def call_before_loop(self, **_: Any) -> None:
        self.start()

    def call_in_loop(self, t: int, **_: Any) -> None:
        # mflux calls this before evaluating step t: steps 0..t-1 are done. Raising here
        # (ctx.progress does on cancel) stops the run and leaves the model usable.
        self.step(t)

    def call_after_loop(self, **_: Any) -> None:
        self.decoding()


def _detach(model: Any, callback: object) -> None:
    registry = model.callbacks
    for name in ("before_loop", "in_loop", "after_loop", "interrupt"):
        items = getattr(registry, name, None)
        if items is not None and callback in items:
            items.remove(callback)


def _bound_prompt_cache(model: Any, size: int) -> None:
    cache = getattr(model, "prompt_cache", None)
    if isinstance(cache, dict):
        while len(cache) > size:
            cache.pop(next(iter(cache)))


def preset_steps(preset: str) -> int:
    from mflux.models.ideogram4.model.ideogram4_scheduler import Ideogram4Scheduler

    return int(Ideogram4Scheduler.get_preset(preset).num_steps)


def generate(ctx: JobContext) -> dict[str, Any]:
    p = ctx.params
    settings = get_settings()
    transient = p["quantize"] != settings.quantize
    options = {"quantize": p["quantize"]} if transient else {}
    ctx.progress(0.0, "loading")
    with ctx.models.use(FP8, options, transient=transient) as model:
        from mflux.models.ideogram4.model.ideogram4_text_encoder.caption import Ideogram4Caption

        prepared = Ideogram4Caption.prepare(p["prompt"])
        if p["strict_caption_validation"] and prepared.warnings:
            raise JobInputError(
                "the caption has issues and strict_caption_validation is on",
                detail={
                    "loc": ["body", "prompt"],
                    "msg": "mflux's caption verifier reported issues and strict_caption_validation is true",
                    "issues": list(prepared.warnings),
                },
            )
        steps = preset_steps(p["preset"])
        previews = LatentPreviews(ctx, model, steps, p["width"], p["height"])
        ctx.progress(0.01, "encoding prompt")
        with GENERATE_LOCK:
            # Made here: its lead-in is timed from the start of this generation.
            progress = Progress(ctx, steps, p["width"] * p["height"])
            model.callbacks.register(progress)
            model.callbacks.register(previews)  # after progress: a cancel stops it first
            started = time.monotonic()
            try:
                generated = model.generate_image(
                    seed=p["seed"],
                    prompt=p["prompt"],
                    width=p["width"],
                    height=p["height"],
                    preset=p["preset"],
                    strict_caption_validation=p["strict_caption_validation"],
                    warn_on_caption_issues=p["warn_on_caption_issues"],
                )
            finally:
                progress.finish()
                _detach(model, progress)
                _detach(model, previews)
                _bound_prompt_cache(model, settings.prompt_cache_size)
        total_s = time.monotonic() - started
        image = generated.image
    ctx.progress(1.0 - SAVE_SHARE, "saving")
    data = encode_image(image, p["format"], p["quality"])
    info = ctx.save_file(
        data,
        filename=f"ideogram4-{p['seed']}.{IMAGE_EXTENSIONS[p['format']]}",
        content_type=IMAGE_MEDIA_TYPES[p["format"]],
    )
    result = ImageResponse(
        model=p["model"],
        prompt=p["prompt"],
        file_id=info.id,
        image_bytes=info.bytes,
        width=image.width,
        height=image.height,
        params={**p, "steps": steps},
        safety_filter_note=SAFETY_FILTER_NOTE,
        timings={"total_s": round(total_s, 3)},
        caption_warnings=list(prepared.warnings) if p["warn_on_caption_issues"] else [],
    )
    return result.model_dump(mode="json")
