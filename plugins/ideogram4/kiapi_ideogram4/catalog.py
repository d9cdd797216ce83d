"""The ideogram4 model catalog: one variant, ``fp8``, with its loader, memory estimate and weights."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from kiapi_core import LoadOptions, ModelSpec, Weights
from kiapi_ideogram4.settings import get_settings

log = logging.getLogger("kiapi.ideogram4")

FAMILY, DOMAIN = "ideogram4", "image"
# Stated by the model's authors for 1024x1024 with V4_DEFAULT_20 (peak RSS), not measured here.
REAL_PEAK_GB = 28.0
REAL_CHECKPOINT_GB = 14.0


def _size_gb(root: Path) -> float:
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):  # a file vanishing mid-walk only shrinks the guess
                total += (Path(dirpath) / name).stat().st_size
    return total / 1024**3


def estimate_memory_gb(weights_dir: Path | None, options: LoadOptions) -> float:
    """Peak resident memory, scaled from the published figure by checkpoint size and bits.

    The published 26-28 GiB peak belongs to the ~14 GB FP8 checkpoint; a smaller checkpoint
    (e.g. the tests' tiny one) scales down, plus a fixed allowance for the VAE and activations.
    """
    override = get_settings().memory_gb
    if override is not None:
        return override
    size = _size_gb(weights_dir) if weights_dir is not None else REAL_CHECKPOINT_GB
    bits = options.get("quantize")
    scale = (bits / 8.0) if bits else 1.0
    return round(max(0.5, REAL_PEAK_GB * min(1.0, size / REAL_CHECKPOINT_GB) * scale + 0.5), 2)


def load(weights_dir: Path | None, options: LoadOptions) -> Any:
    """Build mflux's Ideogram4 from local weights (a worker thread; never downloads)."""
    from kiapi_core import ensure_fast_blas

    ensure_fast_blas(get_settings().blas, "KIAPI_IDEOGRAM4_BLAS")
    # Requests must never download: with a local path mflux needs nothing from the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mflux.models.common.config import ModelConfig
    from mflux.models.ideogram4 import Ideogram4

    if weights_dir is None:
        raise RuntimeError("ideogram4 needs local weights; run: kiapi activate ideogram4")
    return Ideogram4(
        quantize=options.get("quantize"),
        model_path=str(weights_dir),
        model_config=ModelConfig.ideogram4_fp8(),
    )


def unload(model: Any) -> None:
    import mlx.core as mx

    model.prompt_cache.clear()
    mx.clear_cache()


def download() -> Path:
    """Fetch the gated FP8 repo with huggingface_hub (progress bar on the terminal)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    repo = get_settings().repo_id
    how = (
        f"request access at https://huggingface.co/{repo} (approval can take a while), then log in "
        "with `hf auth login` or set HF_TOKEN; or register weights you already have with "
        "`kiapi activate ideogram4 --path DIR`"
    )
    try:
        return Path(snapshot_download(repo_id=repo))
    except GatedRepoError:
        raise RuntimeError(f"{repo} is gated and this account has no access yet: {how}") from None
    except RepositoryNotFoundError:
        raise RuntimeError(f"{repo} was not found or needs a login: {how}") from None
    except HfHubHTTPError as exc:
        raise RuntimeError(f"downloading {repo} failed ({exc}); {how}") from None
    except OSError as exc:  # no network, offline mode, disk full
        raise RuntimeError(f"downloading {repo} failed: {exc}; {how}") from None


def validate(root: Path) -> None:
    """mflux's own FP8 layout check, so a wrong folder fails at activation, not at first use."""
    from mflux.models.ideogram4.weights import Ideogram4WeightDefinition

    try:
        Ideogram4WeightDefinition.validate_fp8_checkpoint(str(root))
    except Exception as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None


FP8 = ModelSpec(
    name="fp8",
    family=FAMILY,
    domain=DOMAIN,
    load=load,
    unload=unload,
    aliases=("ideogram4", "ideogram-4"),
    default=True,
    features=("text", "image", "typography", "json-caption"),
    memory_gb=REAL_PEAK_GB,
    estimate_memory_gb=estimate_memory_gb,
    weights=Weights(source=get_settings().repo_id, download=download, validate=validate),
    description="Ideogram 4 FP8 (ideogram-ai/ideogram-4-fp8) through mflux.",
)

MODELS = [FP8]
