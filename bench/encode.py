"""Image encoding through kiapi's code vs Pillow called directly, 1024x1024, per format.

uv run python bench/encode.py [--repeat 7] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

from PIL import Image

from kiapi_core import encode_image


def pillow_direct(image: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format=fmt.upper(), quality=quality)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # A noisy, photo-like test card: gradients plus noise, as a generation looks to an encoder.
    base = Image.radial_gradient("L").resize((1024, 1024))
    noise = Image.effect_noise((1024, 1024), 40)
    image = Image.merge("RGB", (base, noise, Image.linear_gradient("L").resize((1024, 1024))))
    rows = []
    for fmt in ("png", "jpeg", "webp"):
        ours, direct = [], []
        for _ in range(args.repeat):  # interleaved so drift hits both equally
            t = time.perf_counter()
            a = encode_image(image, fmt, 90)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = pillow_direct(image, fmt, 90)
            direct.append(time.perf_counter() - t)
        rows.append(
            {
                "format": fmt,
                "kiapi_ms": statistics.median(ours) * 1000,
                "pillow_ms": statistics.median(direct) * 1000,
                "ratio": statistics.median(ours) / statistics.median(direct),
                "same_bytes": a == b,
                "bytes": len(a),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("format  kiapi ms  pillow ms  ratio   same bytes  size")
    for r in rows:
        print(
            f"{r['format']:6}  {r['kiapi_ms']:8.1f}  {r['pillow_ms']:9.1f}  {r['ratio']:.3f}   {r['same_bytes']!s:10}  {r['bytes']}"
        )


if __name__ == "__main__":
    main()
