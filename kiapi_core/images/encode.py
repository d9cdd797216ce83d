"""Image encoding with Pillow, without run-specific metadata: same pixels, same bytes (for
image plugins; Pillow is the plugin's dependency, the image object its own)."""

from __future__ import annotations

import io
from typing import Any

IMAGE_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
IMAGE_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def encode_image(image: Any, fmt: str, quality: int) -> bytes:
    """PNG (lossless, quality ignored), JPEG or WEBP at ``quality``; no text/EXIF chunks."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    elif fmt == "jpeg":
        # JPEG has no alpha; convert only when needed (a convert is a full-image copy).
        rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
        rgb.save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unsupported format {fmt!r}")
    return buf.getvalue()
