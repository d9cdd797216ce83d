"""The ideogram4 job handler: runs mflux on a worker thread with honest, cancelable progress.

Progress is split into phases whose shares come from measured durations: prompt encoding,
the denoising steps (reported by mflux's per-step callback), the VAE decode (no callback: a
ticker advances it by the expected duration, never past its share) and saving. On CPU the
decode takes about as long as all the steps, so the fraction stays well below 1.0 until the
image is decoded and stored; the host alone sets 1.0 when the job succeeds.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from kiapi_core import IMAGE_EXTENSIONS, IMAGE_MEDIA_TYPES, JobContext, JobInputError, encode_image
from kiapi_ideogram4.catalog import FP8
from kiapi_ideogram4.preview import LatentPreviews
from kiapi_ideogram4.schemas import SAFETY_FILTER_NOTE, ImageResponse
from kiapi_ideogram4.settings import get_settings

# Shares of the whole job, before any run has been measured.
ENCODE_SHARE = 0.04
SAVE_SHARE = 0.03


class PhaseClock:
    """Learns how long decoding takes relative to a denoising step, per pixel count.

    The ratio depends on the machine and the checkpoint (the tiny test checkpoint decodes
    for ~150 steps' worth, the real model on CPU for about one preset's worth), so it is
    measured and kept in the plugin's data directory (``$KIAPI_HOME/plugins/ideogram4/phases.json``)
    across restarts.
    """

    def __init__(self, path: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._ratio: dict[int, deque[float]] = {}
        self.path = path
        if path is not None:
            try:
                saved = json.loads(path.read_text())
                self._ratio = {int(k): deque(map(float, v), maxlen=5) for k, v in saved.items()}
            except (OSError, ValueError, TypeError, AttributeError):
                self._ratio = {}

    def decode_per_step(self, pixels: int) -> float:
        """Decode time in units of one denoising step (a guess of 20 until measured)."""
        with self._lock:
            samples = self._ratio.get(pixels)
            if not samples and self._ratio:
                # Both phases scale roughly with the pixel count: the nearest size is a fair guess.
                samples = self._ratio[min(self._ratio, key=lambda p: abs(p - pixels))]
            if samples:
                return sum(samples) / len(samples)
        return 20.0

    def record(self, pixels: int, step_s: float, decode_s: float) -> None:
        if step_s <= 0 or decode_s <= 0:
            return
        with self._lock:
            self._ratio.setdefault(pixels, deque(maxlen=5)).append(decode_s / step_s)
            snapshot = {str(k): list(v) for k, v in self._ratio.items()}
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(snapshot))
                tmp.replace(self.path)
            except OSError:
                pass  # only a progress estimate: never fail a job over it


def decode_fraction(elapsed_s: float, expected_s: float) -> float:
    """Share of the decode phase to show: linear to 90% at the expected time, then creeping
    towards (never reaching) 99%, so an overrun never shows the phase as finished."""
    r = elapsed_s / max(expected_s, 1e-3)
    if r <= 1.0:
        return 0.9 * r
    return 0.9 + 0.09 * (1.0 - float(0.5 ** ((r - 1.0) * 4)))  # float ** float is Any to mypy


_CLOCKS: dict[Path, PhaseClock] = {}
_CLOCKS_LOCK = threading.Lock()


def clock_for(ctx: JobContext) -> PhaseClock:
    """The phase clock kept in this plugin's data directory (one per server home)."""
    path = ctx.data_dir / "phases.json"
    with _CLOCKS_LOCK:
        if path not in _CLOCKS:
            _CLOCKS[path] = PhaseClock(path)
        return _CLOCKS[path]


# mflux seeds its noise through mlx's global RNG (mx.random.seed), so two generations at once
# in one process would race on it and lose per-seed determinism; MLX gains nothing from
# running them side by side on one device anyway.
GENERATE_LOCK = threading.Lock()


class Progress:
    """mflux callback object (duck-typed) that maps steps and decode to job progress."""

    def __init__(self, ctx: JobContext, steps: int, pixels: int) -> None:
        self.ctx = ctx
        self.steps = steps
        self.pixels = pixels
        self.clock = clock_for(ctx)
        decode_units = self.clock.decode_per_step(pixels)
        span = 1.0 - ENCODE_SHARE - SAVE_SHARE
        self.denoise_share = span * steps / (steps + decode_units)
        self.decode_start = ENCODE_SHARE + self.denoise_share
        self.decode_end = 1.0 - SAVE_SHARE
        self.loop_started = 0.0
        self.loop_ended = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def call_before_loop(self, **_: Any) -> None:
        self.loop_started = time.monotonic()
        self.ctx.progress(ENCODE_SHARE, f"denoising 0/{self.steps}")

    def call_in_loop(self, t: int, **_: Any) -> None:
        # mflux calls this before evaluating step t: steps 0..t-1 are done. Raising here
        # (ctx.progress does on cancel) stops the run and leaves the model usable.
        done = t
        self.ctx.progress(
            ENCODE_SHARE + self.denoise_share * done / self.steps,
            f"denoising {done + 1}/{self.steps}",
        )

    def call_after_loop(self, **_: Any) -> None:
        self.loop_ended = time.monotonic()
        self.ctx.progress(self.decode_start, "decoding")
        step_s = (self.loop_ended - self.loop_started) / max(1, self.steps)
        expected = self.clock.decode_per_step(self.pixels) * step_s
        self._ticker = threading.Thread(
            target=self._tick, args=(expected,), daemon=True, name="kiapi-ideogram4-decode-progress"
        )
        self._ticker.start()

    def _tick(self, expected_s: float) -> None:
        start = time.monotonic()
        while not self._stop.wait(0.5):
            frac = decode_fraction(time.monotonic() - start, expected_s)
            # From this helper thread: a report that says stop ends the ticker, never the run
            # (the decode cannot be interrupted; the job ends canceled right after it).
            at = self.decode_start + (self.decode_end - self.decode_start) * frac
            if not self.ctx.report_progress(at, None):
                return

    def finish(self) -> float:
        """Stop the ticker; returns the decode duration for the clock."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(2)
        decode_s = time.monotonic() - self.loop_ended if self.loop_ended else 0.0
        if self.loop_ended:
            self.clock.record(
                self.pixels, (self.loop_ended - self.loop_started) / max(1, self.steps), decode_s
            )
        return decode_s


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
        progress = Progress(ctx, steps, p["width"] * p["height"])
        previews = LatentPreviews(ctx, model, steps, p["width"], p["height"])
        ctx.progress(0.01, "encoding prompt")
        with GENERATE_LOCK:
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
