"""The zimage model catalog: one model, ``turbo``, with its loader, memory estimate and weights."""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from kiapi_core import LoadOptions, ModelSpec, Weights
from kiapi_zimage.settings import get_settings

FAMILY, DOMAIN = "zimage", "image"
# Z-Image Turbo in BF16: a 6.15 B-parameter transformer (12.3 GB) and the Qwen3-4B text encoder
# (8.0 GB) plus the FLUX.1 VAE; peak resident memory at 1024x1024 adds activations and mlx's
# buffer cache. Worked out from the parameter counts, not measured here.
REAL_CHECKPOINT_GB = 20.5
REAL_PEAK_GB = 24.0
# A header larger than this is not a safetensors header (the real ones are < 1 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _size_gb(root: Path) -> float:
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):  # a file vanishing mid-walk only shrinks the guess
                total += (Path(dirpath) / name).stat().st_size
    return total / 1024**3


def estimate_memory_gb(weights_dir: Path | None, options: LoadOptions) -> float:
    """Peak resident memory, scaled from the full model's figure by checkpoint size and bits.

    The tests' tiny checkpoint scales down (plus a fixed allowance for the VAE and activations).
    """
    override = get_settings().memory_gb
    if override is not None:
        return override
    size = _size_gb(weights_dir) if weights_dir is not None else REAL_CHECKPOINT_GB
    bits = options.get("quantize")
    scale = (bits / 16.0) if bits else 1.0  # the checkpoint is BF16: 16 bits per weight
    return round(max(0.5, REAL_PEAK_GB * min(1.0, size / REAL_CHECKPOINT_GB) * scale + 0.5), 2)


def load(weights_dir: Path | None, options: LoadOptions) -> Any:
    """Build mflux's ZImage from local weights (a worker thread; never downloads)."""
    from kiapi_core import ensure_fast_blas

    ensure_fast_blas(get_settings().blas, "KIAPI_ZIMAGE_BLAS")
    # Requests must never download: with a local path mflux needs nothing from the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mflux.models.common.config import ModelConfig
    from mflux.models.z_image import ZImage

    if weights_dir is None:
        raise RuntimeError("zimage needs local weights; run: kiapi activate zimage")
    return ZImage(
        quantize=options.get("quantize"),
        model_path=str(weights_dir),
        model_config=ModelConfig.z_image_turbo(),
    )


def unload(model: Any) -> None:
    import mlx.core as mx

    mx.clear_cache()


def download_patterns() -> list[str]:
    """What mflux itself fetches for Z-Image (weights, configs, tokenizer), nothing more."""
    from mflux.models.z_image.weights.z_image_weight_definition import ZImageWeightDefinition

    patterns = list(ZImageWeightDefinition.get_download_patterns())
    for tokenizer in ZImageWeightDefinition.get_tokenizers():
        patterns += [p for p in tokenizer.download_patterns or [] if p not in patterns]
    return [*patterns, "model_index.json", "scheduler/*"]


def download() -> Path:
    """Fetch the weights with huggingface_hub (progress bar on the terminal), at the revision
    mflux pins for this repo."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    from mflux.models.common.resolution.model_revisions import ModelRevisions

    repo = get_settings().repo_id
    how = (
        f"if https://huggingface.co/{repo} asks for it, accept its terms, then log in with "
        "`hf auth login` or set HF_TOKEN (request access if the repo is gated); or register "
        "weights you already have with `kiapi activate zimage --path DIR`"
    )
    try:
        return Path(
            snapshot_download(
                repo_id=repo, allow_patterns=download_patterns(), revision=ModelRevisions.get(repo)
            )
        )
    except GatedRepoError:
        raise RuntimeError(
            f"{repo} is gated and this account has no access yet: request access at "
            f"https://huggingface.co/{repo}, then {how}"
        ) from None
    except RepositoryNotFoundError:
        raise RuntimeError(f"{repo} was not found or needs a login: {how}") from None
    except HfHubHTTPError as exc:
        raise RuntimeError(f"downloading {repo} failed ({exc}); {how}") from None
    except OSError as exc:  # no network, offline mode, disk full
        raise RuntimeError(f"downloading {repo} failed: {exc}; {how}") from None


def _tensor_names(directory: Path) -> set[str]:
    """The tensor names of every safetensors file in ``directory``, from the headers only."""
    names: set[str] = set()
    for file in sorted(directory.glob("*.safetensors")):
        if file.name.startswith("._"):
            continue
        try:
            with file.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > _MAX_HEADER_BYTES:
                    raise ValueError("header too large")
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error) as exc:
            raise ValueError(f"{file} is not a readable safetensors file ({exc})") from None
        names.update(k for k in header if k != "__metadata__")
    return names


def validate(root: Path) -> None:
    """Check ``root`` against mflux's own Z-Image weight definition, reading headers only:
    every component's folder, every weight its mapping requires, every layer it builds, and
    the tokenizer; so a wrong folder fails at activation, not at first use."""
    from mflux.models.common.weights.mapping.weight_mapper import WeightMapper
    from mflux.models.z_image.weights.z_image_weight_definition import ZImageWeightDefinition

    for component in ZImageWeightDefinition.get_components():
        folder = root / component.hf_subdir
        names = _tensor_names(folder) if folder.is_dir() else set()
        if not names:
            raise ValueError(
                f"{root} is not a Z-Image checkpoint: no {component.hf_subdir}/*.safetensors "
                "(expected the layout of Tongyi-MAI/Z-Image-Turbo)"
            )
        if component.mapping_getter is None:
            continue
        missing = WeightMapper.missing_required_names(
            hf_weights=dict.fromkeys(names),
            mapping=component.mapping_getter(),
            num_blocks=component.num_blocks,
            num_layers=component.num_layers,
        )
        if missing:
            raise ValueError(
                f"the {component.name} weights in {folder} do not fit Z-Image: {len(missing)} "
                f"required weights are missing (e.g. {', '.join(missing[:3])})"
            )
        if component.num_layers:
            layers = {int(m.group(1)) for n in names if (m := _LAYER.search(n))}
            if layers != set(range(component.num_layers)):
                raise ValueError(
                    f"the {component.name} weights in {folder} have {len(layers)} layers; "
                    f"mflux builds Z-Image's with {component.num_layers}"
                )
    for tokenizer in ZImageWeightDefinition.get_tokenizers():
        folder = root / tokenizer.hf_subdir
        if not (folder / "tokenizer_config.json").is_file() or not (
            (folder / "tokenizer.json").is_file()
            or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
        ):
            raise ValueError(
                f"{root} has no usable tokenizer in {tokenizer.hf_subdir}/ (tokenizer_config.json "
                "and tokenizer.json or vocab.json + merges.txt)"
            )


TURBO = ModelSpec(
    name="turbo",
    family=FAMILY,
    domain=DOMAIN,
    load=load,
    unload=unload,
    aliases=("zimage", "z-image", "z-image-turbo"),
    default=True,
    features=("text", "image", "fast"),
    memory_gb=REAL_PEAK_GB,
    estimate_memory_gb=estimate_memory_gb,
    weights=Weights(source=get_settings().repo_id, download=download, validate=validate),
    description="Z-Image Turbo (Tongyi-MAI/Z-Image-Turbo, BF16) through mflux.",
)

MODELS = [TURBO]
