"""The Z-Image latent -> RGB preview projection: shapes, and a known latent's colours."""

from __future__ import annotations

import numpy as np
from kiapi_zimage.preview import FLUX_RGB_BIAS, FLUX_RGB_FACTORS, latent_to_rgb


def test_known_latent_gives_known_colors() -> None:
    h, w = 256, 384
    latents = np.zeros((16, 1, h // 8, w // 8), np.float32)  # mflux's own layout
    latents[12, 0, 3, 7] = 1.0  # channel 12 at row 3, column 7
    pixels = latent_to_rgb(latents, h, w)
    assert pixels.shape == (32, 48, 3) and pixels.dtype == np.uint8
    base = np.round((FLUX_RGB_BIAS + 1) / 2 * 255)
    lit = np.round((FLUX_RGB_BIAS + FLUX_RGB_FACTORS[12] + 1) / 2 * 255)
    assert (pixels[3, 7] == lit).all() and tuple(lit) == (134, 128, 126)
    pixels[3, 7] = base
    assert (pixels == base).all()
