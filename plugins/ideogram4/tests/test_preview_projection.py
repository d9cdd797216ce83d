"""The latent -> RGB preview projection: its spaces against mflux's own code, and known colors."""

from __future__ import annotations

import numpy as np
from kiapi_ideogram4.preview import (
    FLUX2_RGB_BIAS,
    FLUX2_RGB_FACTORS,
    LatentSpaces,
    latent_to_rgb,
    latent_to_signed_rgb,
)

H, W = 256, 320  # a 16 x 20 token grid: rows and columns cannot be confused
GH, GW = H // 16, W // 16


def identity_spaces() -> LatentSpaces:
    """Spaces A, B and C coincide: what goes in is FLUX.2's normalized latent."""
    eps = 1e-4
    return LatentSpaces.of(np.zeros(128), np.ones(128), np.zeros(128), np.full(128, 1 - eps), eps)


def test_matches_mflux_unpack_and_the_vae_normalization() -> None:
    import mlx.core as mx
    from mflux.models.flux2.latent_creator.flux2_latent_creator import Flux2LatentCreator
    from mflux.models.flux2.model.flux2_vae.vae import Flux2VAE
    from mflux.models.ideogram4.latent_creator import Ideogram4LatentCreator

    rng = np.random.default_rng(4)
    z = rng.standard_normal((1, GH * GW, 128)).astype(np.float32)
    mean = rng.normal(0, 0.3, 128).astype(np.float32)
    var = rng.uniform(0.5, 2.0, 128).astype(np.float32)
    eps = 1e-4
    # mflux: A -> B (unpack_latents, to the plain 32-channel VAE latent), then the VAE's
    # normalize_latents (patchify, batch-norm statistics, unpatchify) -> C.
    plain = Ideogram4LatentCreator.unpack_latents(mx.array(z), H, W).astype(mx.float32)
    packed = Flux2LatentCreator.patchify_latents(plain)
    normed = (packed - mx.array(mean).reshape(1, -1, 1, 1)) / mx.sqrt(
        mx.array(var).reshape(1, -1, 1, 1) + eps
    )
    c = np.asarray(Flux2VAE._unpatchify_latents(normed))[0]  # (32, 2 GH, 2 GW)
    expected = np.einsum("chw,ck->hwk", c, FLUX2_RGB_FACTORS) + FLUX2_RGB_BIAS

    spaces = LatentSpaces.of(
        Ideogram4LatentCreator.LATENT_SHIFT, Ideogram4LatentCreator.LATENT_SCALE, mean, var, eps
    )
    got = latent_to_signed_rgb(z, H, W, spaces)
    assert got.shape == (H // 8, W // 8, 3) == expected.shape
    # mflux's unpack rounds to bfloat16: a few thousandths at most here.
    assert np.abs(got - expected).max() < 0.02
    pixels = latent_to_rgb(z, H, W, spaces)
    assert pixels.dtype == np.uint8 and pixels.shape == (H // 8, W // 8, 3)


def test_known_latents_give_known_colors() -> None:
    base = np.round((FLUX2_RGB_BIAS + 1) / 2 * 255)
    zero = np.zeros((GH * GW, 128), np.float32)
    assert (latent_to_rgb(zero, H, W, identity_spaces()) == base).all()  # rgb = bias: grey

    # Token (row 2, column 5), patch position (i=0, j=1), channel 3: the 4th factor's colour
    # at pixel (2 * 2 + 0, 2 * 5 + 1) only.
    z = zero.copy()
    z[2 * GW + 5, 0 * 64 + 1 * 32 + 3] = 1.0
    pixels = latent_to_rgb(z, H, W, identity_spaces())
    lit = np.round((FLUX2_RGB_BIAS + FLUX2_RGB_FACTORS[3] + 1) / 2 * 255)
    assert (pixels[4, 11] == lit).all() and tuple(lit) == (151, 157, 163)
    pixels[4, 11] = base
    assert (pixels == base).all()


def test_the_vae_statistics_are_read_in_their_own_channel_order() -> None:
    """running_mean index c * 4 + i * 2 + j is channel c at patch position (i, j)."""
    eps = 1e-4
    mean = np.zeros(128, np.float32)
    mean[3 * 4 + 0 * 2 + 1] = 1.0  # channel 3, i=0, j=1
    spaces = LatentSpaces.of(np.zeros(128), np.ones(128), mean, np.full(128, 1 - eps), eps)
    pixels = latent_to_rgb(np.zeros((GH * GW, 128), np.float32), H, W, spaces)
    shifted = np.round((FLUX2_RGB_BIAS - FLUX2_RGB_FACTORS[3] + 1) / 2 * 255)
    base = np.round((FLUX2_RGB_BIAS + 1) / 2 * 255)
    assert (pixels[0::2, 1::2] == shifted).all()  # even rows, odd columns
    assert (pixels[1::2] == base).all() and (pixels[0::2, 0::2] == base).all()
