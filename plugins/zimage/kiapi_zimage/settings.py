"""The plugin's own settings: ``KIAPI_ZIMAGE_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field

from kiapi_core import EnvSettings

# mflux's default step count for z-image-turbo (mflux.cli.defaults MODEL_INFERENCE_STEPS).
MFLUX_DEFAULT_STEPS = 9


class ZImageSettings(EnvSettings):
    env_prefix = "KIAPI_ZIMAGE_"

    default_steps: int = Field(
        MFLUX_DEFAULT_STEPS, ge=1, le=50, description="Denoising steps when a request names none."
    )
    default_width: int = Field(1024, ge=64, le=2048, multiple_of=16)
    default_height: int = Field(1024, ge=64, le=2048, multiple_of=16)
    quantize: Literal[3, 4, 5, 6, 8] | None = Field(
        None, description="Quantization of the resident model; None keeps the BF16 weights."
    )
    memory_gb: float | None = Field(
        None, gt=0, description="Override the resident-memory estimate used by the host's budget."
    )
    blas: str = Field(
        "auto",
        description="Linux CPU only: 'auto' loads OpenBLAS before mlx when installed, 'bundled' "
        "keeps mlx's reference BLAS, or a path to a BLAS shared library.",
    )
    repo_id: str = Field(
        "Tongyi-MAI/Z-Image-Turbo", description="Hugging Face repo of the weights."
    )


@lru_cache(maxsize=1)
def get_settings() -> ZImageSettings:
    return ZImageSettings()
