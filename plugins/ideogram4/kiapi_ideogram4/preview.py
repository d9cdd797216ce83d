"""Live previews of an Ideogram 4 generation: the current latent to RGB by a linear map, no VAE.

Each denoising step's latent goes through these spaces (shapes for a ``height`` x ``width``
image, ``gh, gw = height // 16, width // 16``):

A. Ideogram's transformer space: ``(gh * gw, 128)`` tokens normalized with Ideogram's own
   per-channel LATENT_SHIFT / LATENT_SCALE. A token's 128 channels are a 2x2 patch of the
   32-channel VAE latent, ordered ``(i, j, c)`` (row offset, column offset, channel), as
   mflux's ``Ideogram4LatentCreator.unpack_latents`` reads them.
B. The FLUX.2 VAE latent (what ``Flux2VAE.decode`` takes), still one 2x2 patch per token:
   ``z * LATENT_SCALE + LATENT_SHIFT`` (the first half of ``unpack_latents``).
C. FLUX.2's normalized latent: B with the VAE's batch-norm statistics taken out,
   ``(B - running_mean) / sqrt(running_var + eps)``. Those statistics index a patch's channels
   as ``c * 4 + i * 2 + j`` (``Flux2LatentCreator.patchify_latents``), so they are reordered
   to ``(i, j, c)`` first. ComfyUI's FLUX.2 latents live in this space; its ``Flux2`` format's
   ``latent_rgb_factors`` were fitted here (``Flux2VAE.normalize_latents`` is the same map).
D. RGB in about [-1, 1]: C times the 32x3 factors plus the bias, per VAE-latent pixel, the
   2x2 patches laid out at twice the token grid: ``(2 * gh, 2 * gw, 3)``, 1/8 of the image.
E. Pixels: ``(D + 1) / 2`` clipped to [0, 1], as uint8.

About a millisecond of numpy per preview at 1024x1024; the step it shows is computed anyway
(mflux evaluates the latent right after the callback).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from kiapi_core import JobContext

F32 = npt.NDArray[np.float32]

# ComfyUI comfy/latent_formats.py, class Flux2: latent_rgb_factors (32 x 3, R G B) and bias.
FLUX2_RGB_FACTORS: F32 = np.array(
    [
        [0.0058, 0.0113, 0.0073],
        [0.0495, 0.0443, 0.0836],
        [-0.0099, 0.0096, 0.0644],
        [0.2144, 0.3009, 0.3652],
        [0.0166, -0.0039, -0.0054],
        [0.0157, 0.0103, -0.0160],
        [-0.0398, 0.0902, -0.0235],
        [-0.0052, 0.0095, 0.0109],
        [-0.3527, -0.2712, -0.1666],
        [-0.0301, -0.0356, -0.0180],
        [-0.0107, 0.0078, 0.0013],
        [0.0746, 0.0090, -0.0941],
        [0.0156, 0.0169, 0.0070],
        [-0.0034, -0.0040, -0.0114],
        [0.0032, 0.0181, 0.0080],
        [-0.0939, -0.0008, 0.0186],
        [0.0018, 0.0043, 0.0104],
        [0.0284, 0.0056, -0.0127],
        [-0.0024, -0.0022, -0.0030],
        [0.1207, -0.0026, 0.0065],
        [0.0128, 0.0101, 0.0142],
        [0.0137, -0.0072, -0.0007],
        [0.0095, 0.0092, -0.0059],
        [0.0000, -0.0077, -0.0049],
        [-0.0465, -0.0204, -0.0312],
        [0.0095, 0.0012, -0.0066],
        [0.0290, -0.0034, 0.0025],
        [0.0220, 0.0169, -0.0048],
        [-0.0332, -0.0457, -0.0468],
        [-0.0085, 0.0389, 0.0609],
        [-0.0076, 0.0003, -0.0043],
        [-0.0111, -0.0460, -0.0614],
    ],
    dtype=np.float32,
)
FLUX2_RGB_BIAS: F32 = np.array([-0.0329, -0.0718, -0.0851], dtype=np.float32)
VAE_CHANNELS = 32


@dataclass(frozen=True)
class LatentSpaces:
    """The constants between the spaces, each ``(2, 2, 32)`` in ``(i, j, c)`` order."""

    shift: F32  # A -> B: Ideogram's LATENT_SHIFT
    scale: F32  # A -> B: Ideogram's LATENT_SCALE
    bn_mean: F32  # B -> C: the VAE's batch-norm running_mean
    bn_std: F32  # B -> C: sqrt(running_var + eps)

    @classmethod
    def of(
        cls, shift: Any, scale: Any, running_mean: Any, running_var: Any, eps: float
    ) -> LatentSpaces:
        """From Ideogram's 128 constants (``(i, j, c)`` order) and the VAE's 128 statistics
        (``c * 4 + i * 2 + j`` order)."""

        def tokens(values: Any) -> F32:
            return np.asarray(values, dtype=np.float32).reshape(2, 2, VAE_CHANNELS)

        def patches(values: Any) -> F32:
            flat = np.asarray(values, dtype=np.float32).reshape(VAE_CHANNELS, 2, 2)
            return np.ascontiguousarray(flat.transpose(1, 2, 0))

        std = np.sqrt(patches(running_var) + np.float32(eps)).astype(np.float32)
        return cls(tokens(shift), tokens(scale), patches(running_mean), std)

    @classmethod
    def of_model(cls, model: Any) -> LatentSpaces:
        """Ideogram's constants (mflux) and the loaded model's own VAE statistics."""
        from mflux.models.ideogram4.latent_creator import Ideogram4LatentCreator

        bn = model.vae.bn
        return cls.of(
            Ideogram4LatentCreator.LATENT_SHIFT,
            Ideogram4LatentCreator.LATENT_SCALE,
            _numpy(bn.running_mean),
            _numpy(bn.running_var),
            float(bn.eps),
        )


def _numpy(array: Any) -> F32:
    import mlx.core as mx

    # numpy cannot read bfloat16 from mlx: widen first.
    return np.asarray(array.astype(mx.float32), dtype=np.float32)


def latent_to_signed_rgb(
    z: Any, height: int, width: int, spaces: LatentSpaces
) -> npt.NDArray[np.floating[Any]]:
    """Space A (``(gh * gw, 128)``, or with a batch of one in front) to D:
    ``(height // 8, width // 8, 3)``, about [-1, 1]."""
    gh, gw = height // 16, width // 16
    a = np.asarray(z, dtype=np.float32).reshape(gh, gw, 2, 2, VAE_CHANNELS)
    b = a * spaces.scale + spaces.shift
    c = (b - spaces.bn_mean) / spaces.bn_std
    d: npt.NDArray[np.floating[Any]] = c @ FLUX2_RGB_FACTORS + FLUX2_RGB_BIAS  # (gh, gw, i, j, rgb)
    return d.transpose(0, 2, 1, 3, 4).reshape(2 * gh, 2 * gw, 3)


def latent_to_rgb(z: Any, height: int, width: int, spaces: LatentSpaces) -> npt.NDArray[np.uint8]:
    """Space A to E: a ``(height // 8, width // 8, 3)`` uint8 picture."""
    e = np.clip((latent_to_signed_rgb(z, height, width, spaces) + 1.0) * 0.5, 0.0, 1.0)
    pixels: npt.NDArray[np.uint8] = (e * 255.0 + 0.5).astype(np.uint8)
    return pixels


class LatentPreviews:
    """mflux in-loop callback (duck-typed) publishing a preview when the job wants one."""

    def __init__(self, ctx: JobContext, model: Any, steps: int, width: int, height: int) -> None:
        self.ctx = ctx
        self.model = model
        self.steps, self.width, self.height = steps, width, height
        self._spaces: LatentSpaces | None = None
        self._broken = False

    def call_in_loop(self, t: int, latents: Any, **_: Any) -> None:
        step = t + 1  # ``latents`` is the result of step t (0-based): t + 1 steps done
        if self._broken or not self.ctx.wants_preview(step):
            return
        try:
            from PIL import Image

            if self._spaces is None:
                self._spaces = LatentSpaces.of_model(self.model)
            pixels = latent_to_rgb(_numpy(latents), self.height, self.width, self._spaces)
            self.ctx.publish_preview(Image.fromarray(pixels, "RGB"), step=step, steps=self.steps)
        except Exception:
            # A preview is a hint: the generation goes on without them.
            self._broken = True
            self.ctx.log.exception("job %s: no more previews", self.ctx.job_id)
