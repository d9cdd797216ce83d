"""Live previews: the small image a running job shows of itself (docs/jobs.md, Previews).

A handler publishes one with ``ctx.publish_preview(image, step=, steps=)``; the host keeps
only the latest per job, never as an artifact, and forgets it when the job ends. Where it is
kept depends on the backend: in the server's memory (embedded; the worker process sends it
over its pipe), or in Redis under a key with a TTL (celery), announced on the job events
channel so every API node can tell its SSE followers.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

# The bound: previews are glanced at, never inspected; the UI scales them up.
PREVIEW_MAX_SIDE = 256
PREVIEW_QUALITY = 80
PREVIEW_MEDIA_TYPES = ("image/jpeg", "image/webp")
# A preview is dropped when its job ends; these bound what a lost end (a worker killed
# mid-job) can leave behind.
PREVIEW_TTL_S = 600.0
MAX_PREVIEWS = 256


@dataclass(frozen=True)
class PreviewInfo:
    """What an SSE ``preview`` event says of a preview (its bytes are at GET .../preview)."""

    job_id: str
    step: int
    steps: int
    width: int
    height: int
    media_type: str
    etag: str

    def event_data(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "step": self.step,
            "steps": self.steps,
            "width": self.width,
            "height": self.height,
            "media_type": self.media_type,
        }


@dataclass(frozen=True)
class Preview:
    info: PreviewInfo
    data: bytes


class PreviewSink(Protocol):
    """Where a worker puts a job's previews (and drops them at its end)."""

    def put(self, preview: Preview) -> None: ...
    def drop(self, job_id: str) -> None: ...


class PreviewStore(PreviewSink, Protocol):
    """A sink the API can read back: the latest preview of a job, or None."""

    def get(self, job_id: str) -> Preview | None: ...


class MemoryPreviews:
    """The embedded backend's previews: the latest per job, in the server's memory.

    ``on_put`` tells followers (the node's ``JobEvents.publish_preview``). Bounded by count
    and age, so jobs whose end never came (a killed worker) cannot pile up.
    """

    def __init__(self, on_put: Callable[[PreviewInfo], None] | None = None) -> None:
        self._on_put = on_put
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[float, Preview]] = OrderedDict()

    def put(self, preview: Preview) -> None:
        now = time.monotonic()
        with self._lock:
            self._items.pop(preview.info.job_id, None)
            self._items[preview.info.job_id] = (now, preview)
            while len(self._items) > MAX_PREVIEWS:
                self._items.popitem(last=False)
        if self._on_put is not None:
            self._on_put(preview.info)

    def get(self, job_id: str) -> Preview | None:
        with self._lock:
            item = self._items.get(job_id)
            if item is None:
                return None
            if time.monotonic() - item[0] > PREVIEW_TTL_S:
                del self._items[job_id]
                return None
            return item[1]

    def drop(self, job_id: str) -> None:
        with self._lock:
            self._items.pop(job_id, None)


def etag_of(data: bytes) -> str:
    return '"' + hashlib.blake2b(data, digest_size=8).hexdigest() + '"'


def encode_preview(image: Any) -> tuple[bytes, int, int, str]:
    """``image`` (a PIL image, or encoded image bytes) as a preview: (bytes, width, height,
    media type), the longest side at most PREVIEW_MAX_SIDE, JPEG (or the WebP/JPEG given,
    when already small enough). Bytes need Pillow to be read; a PIL image brings it along."""
    from PIL import Image  # the plugin's dependency, as is the image it hands over

    if isinstance(image, bytes | bytearray | memoryview):
        raw = bytes(image)
        try:
            opened = Image.open(io.BytesIO(raw))
            opened.load()
        except Exception as exc:
            raise ValueError(
                f"publish_preview: the bytes are no image Pillow can read ({exc})"
            ) from None
        media = Image.MIME.get(opened.format or "")
        if media in PREVIEW_MEDIA_TYPES and max(opened.size) <= PREVIEW_MAX_SIDE:
            return raw, opened.width, opened.height, media
        image = opened
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"publish_preview takes a PIL image or encoded image bytes, not {type(image).__name__}"
        )
    if max(image.size) > PREVIEW_MAX_SIDE:
        image = image.copy()
        image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE), Image.Resampling.BILINEAR)
    rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=PREVIEW_QUALITY)
    return buf.getvalue(), rgb.width, rgb.height, "image/jpeg"


def build_preview(job_id: str, image: Any, step: int, steps: int) -> Preview:
    data, width, height, media_type = encode_preview(image)
    info = PreviewInfo(job_id, step, steps, width, height, media_type, etag_of(data))
    return Preview(info, data)


class PreviewGate:
    """When a job's next preview is wanted: previews on (server and request), every
    KIAPI_PREVIEW_EVERY-th step, and KIAPI_PREVIEW_MIN_INTERVAL_S since the last one."""

    def __init__(self, enabled: bool, every: int, min_interval_s: float) -> None:
        self.enabled = enabled
        self.every = max(1, every)
        self.min_interval_s = min_interval_s
        self._last_at = -float("inf")

    def wants(self, step: int) -> bool:
        if not self.enabled or step % self.every:
            return False
        return time.monotonic() - self._last_at >= self.min_interval_s

    def published(self) -> None:
        self._last_at = time.monotonic()
