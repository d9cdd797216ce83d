"""The plugin's own settings: ``KIAPI_IDEOGRAM4_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field

from kiapi_core import EnvSettings

Preset = Literal["V4_DEFAULT_20", "V4_QUALITY_48", "V4_TURBO_12"]


class Ideogram4Settings(EnvSettings):
    env_prefix = "KIAPI_IDEOGRAM4_"

    default_preset: Preset = Field("V4_DEFAULT_20", description="Preset when a request names none.")
    default_width: int = Field(1024, ge=256, le=2048, multiple_of=16)
    default_height: int = Field(1024, ge=256, le=2048, multiple_of=16)
    quantize: Literal[3, 4, 5, 6, 8] | None = Field(
        None, description="Quantization of the resident model; None keeps the FP8 checkpoint as is."
    )
    memory_gb: float | None = Field(
        None, gt=0, description="Override the resident-memory estimate used by the host's budget."
    )
    prompt_cache_size: int = Field(
        16, ge=0, description="Encoded prompts kept per model (mflux's cache would grow forever)."
    )
    blas: str = Field(
        "auto",
        description="Linux CPU only: 'auto' loads OpenBLAS before mlx when installed, 'bundled' "
        "keeps mlx's reference BLAS (about 14x slower), or a path to a BLAS shared library.",
    )
    repo_id: str = Field(
        "ideogram-ai/ideogram-4-fp8", description="Hugging Face repo of the weights."
    )


@lru_cache(maxsize=1)
def get_settings() -> Ideogram4Settings:
    return Ideogram4Settings()
