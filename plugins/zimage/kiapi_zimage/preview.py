"""Live previews of a Z-Image generation: the current latent to RGB by a linear map, no VAE.

Z-Image denoises in the FLUX.1 VAE's latent space, 16 channels at 1/8 of the image:

A. mflux's latent, ``(16, 1, height // 8, width // 8)``, already scaled and shifted the way
   the VAE encoder leaves it, ``(mean - 0.1159) * 0.3611`` (``ZImageVAE``): the space of
   ComfyUI's ``Flux`` latent format (after its ``process_in``), where its
   ``latent_rgb_factors`` were fitted.
B. RGB in about [-1, 1]: the 16x3 factors plus the bias, per latent pixel:
   ``(height // 8, width // 8, 3)``.
C. Pixels: ``(B + 1) / 2`` clipped to [0, 1], as uint8.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from kiapi_core import JobContext

# ComfyUI comfy/latent_formats.py, class Flux: latent_rgb_factors (16 x 3, R G B) and bias.
FLUX_RGB_FACTORS: npt.NDArray[np.float32] = np.array(
    [
        [-0.0346, 0.0244, 0.0681],
        [0.0034, 0.0210, 0.0687],
        [0.0275, -0.0668, -0.0433],
        [-0.0174, 0.0160, 0.0617],
        [0.0859, 0.0721, 0.0329],
        [0.0004, 0.0383, 0.0115],
        [0.0405, 0.0861, 0.0915],
        [-0.0236, -0.0185, -0.0259],
        [-0.0245, 0.0250, 0.1180],
        [0.1008, 0.0755, -0.0421],
        [-0.0515, 0.0201, 0.0011],
        [0.0428, -0.0012, -0.0036],
        [0.0817, 0.0765, 0.0749],
        [-0.1264, -0.0522, -0.1103],
        [-0.0280, -0.0881, -0.0499],
        [-0.1262, -0.0982, -0.0778],
    ],
    dtype=np.float32,
)
FLUX_RGB_BIAS: npt.NDArray[np.float32] = np.array([-0.0329, -0.0718, -0.0851], dtype=np.float32)


def latent_to_rgb(latents: Any, height: int, width: int) -> npt.NDArray[np.uint8]:
    """Space A (any shape holding ``16 * (height // 8) * (width // 8)`` values, channels
    first) to C: a ``(height // 8, width // 8, 3)`` uint8 picture."""
    h, w = height // 8, width // 8
    a = np.asarray(latents, dtype=np.float32).reshape(16, h, w)
    b: npt.NDArray[np.float32] = a.transpose(1, 2, 0) @ FLUX_RGB_FACTORS + FLUX_RGB_BIAS
    c = np.clip((b + 1.0) * 0.5, 0.0, 1.0)
    pixels: npt.NDArray[np.uint8] = (c * 255.0 + 0.5).astype(np.uint8)
    return pixels


class LatentPreviews:
    """mflux in-loop callback (duck-typed) publishing a preview when the job wants one."""

    def __init__(self, ctx: JobContext, steps: int, width: int, height: int) -> None:
        self.ctx = ctx
        self.steps, self.width, self.height = steps, width, height
        self._broken = False

    def call_in_loop(self, t: int, latents: Any, **_: Any) -> None:
        step = t + 1  # ``latents`` is the result of step t (0-based)
        if self._broken or not self.ctx.wants_preview(step):
            return
        try:
            import mlx.core as mx
            from PIL import Image

            values = np.asarray(latents.astype(mx.float32), dtype=np.float32)
            pixels = latent_to_rgb(values, self.height, self.width)
            self.ctx.publish_preview(Image.fromarray(pixels, "RGB"), step=step, steps=self.steps)
        except Exception:
            # A preview is a hint: the generation goes on without them.
            self._broken = True
            self.ctx.log.exception("job %s: no more previews", self.ctx.job_id)
