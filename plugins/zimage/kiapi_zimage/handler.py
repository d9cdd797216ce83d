"""The zimage job handler: runs mflux on a worker thread with honest, cancelable progress.

Progress is split into phases whose shares come from measured durations: the denoising steps
(mflux's per-step callback; the prompt is encoded lazily, so step 1 also pays for the text
encoder), the VAE decode (no callback: a ticker advances it by the expected duration, never past
its share) and saving. The fraction stays below 1.0 until the image is decoded and stored; the
host alone sets 1.0 when the job succeeds.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from kiapi_core import IMAGE_EXTENSIONS, IMAGE_MEDIA_TYPES, JobContext, encode_image
from kiapi_zimage.catalog import TURBO
from kiapi_zimage.preview import LatentPreviews
from kiapi_zimage.schemas import ZImageResponse
from kiapi_zimage.settings import get_settings

START_SHARE = 0.02
SAVE_SHARE = 0.03


class PhaseClock:
    """Learns how long decoding takes relative to a denoising step, per pixel count, and keeps
    it in the plugin's data directory (``$KIAPI_HOME/plugins/zimage/phases.json``)."""

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
        """Decode time in units of one denoising step (a guess of 2 until measured)."""
        with self._lock:
            samples = self._ratio.get(pixels)
            if not samples and self._ratio:
                samples = self._ratio[min(self._ratio, key=lambda p: abs(p - pixels))]
            if samples:
                return sum(samples) / len(samples)
        return 2.0

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
    return 0.9 + 0.09 * (1.0 - float(0.5 ** ((r - 1.0) * 4)))


_CLOCKS: dict[Path, PhaseClock] = {}
_CLOCKS_LOCK = threading.Lock()


def clock_for(ctx: JobContext) -> PhaseClock:
    path = ctx.data_dir / "phases.json"
    with _CLOCKS_LOCK:
        if path not in _CLOCKS:
            _CLOCKS[path] = PhaseClock(path)
        return _CLOCKS[path]


# MLX gains nothing from two generations side by side on one device, and mx.compile'd
# predict functions are not meant to run concurrently.
GENERATE_LOCK = threading.Lock()


class Progress:
    """mflux callback object (duck-typed) that maps steps and decode to job progress."""

    def __init__(self, ctx: JobContext, steps: int, pixels: int) -> None:
        self.ctx = ctx
        self.steps = steps
        self.pixels = pixels
        self.clock = clock_for(ctx)
        decode_units = self.clock.decode_per_step(pixels)
        span = 1.0 - START_SHARE - SAVE_SHARE
        self.denoise_share = span * steps / (steps + decode_units)
        self.decode_start = START_SHARE + self.denoise_share
        self.decode_end = 1.0 - SAVE_SHARE
        self.loop_started = 0.0
        self.first_step_done = 0.0
        self.loop_ended = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def call_before_loop(self, **_: Any) -> None:
        self.loop_started = time.monotonic()
        self.ctx.progress(START_SHARE, f"denoising 1/{self.steps}")

    def call_in_loop(self, t: int, **_: Any) -> None:
        # Called after step t was queued; mlx evaluates it right after, so steps 0..t-1 are
        # done. Raising here (ctx.progress does on cancel) stops the run; the model stays usable.
        if t == 1:
            self.first_step_done = time.monotonic()
        self.ctx.progress(
            START_SHARE + self.denoise_share * t / self.steps,
            f"denoising {t + 1}/{self.steps}",
        )

    def call_after_loop(self, **_: Any) -> None:
        self.loop_ended = time.monotonic()
        self.ctx.progress(self.decode_start, "decoding")
        expected = self.clock.decode_per_step(self.pixels) * self.step_s()
        self._ticker = threading.Thread(
            target=self._tick, args=(expected,), daemon=True, name="kiapi-zimage-decode-progress"
        )
        self._ticker.start()

    def step_s(self) -> float:
        # Step 1 also encodes the prompt (lazily evaluated): time the later steps when there are.
        if self.first_step_done and self.steps > 1:
            return (self.loop_ended - self.first_step_done) / (self.steps - 1)
        return (self.loop_ended - self.loop_started) / max(1, self.steps)

    def _tick(self, expected_s: float) -> None:
        start = time.monotonic()
        while not self._stop.wait(0.5):
            frac = decode_fraction(time.monotonic() - start, expected_s)
            at = self.decode_start + (self.decode_end - self.decode_start) * frac
            # A report that says stop ends the ticker, never the run (the decode cannot be
            # interrupted; the job ends canceled right after it).
            if not self.ctx.report_progress(at, None):
                return

    def finish(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(2)
        if self.loop_ended:
            self.clock.record(self.pixels, self.step_s(), time.monotonic() - self.loop_ended)


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
        progress = Progress(ctx, p["steps"], p["width"] * p["height"])
        previews = LatentPreviews(ctx, p["steps"], p["width"], p["height"])
        ctx.progress(0.01, "encoding prompt")
        with GENERATE_LOCK:
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
