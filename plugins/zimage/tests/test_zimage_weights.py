"""The tiny checkpoint (layout, size, determinism) and activating weights: `kiapi activate`
validated with mflux's own weight definition, `kiapi status`, the download message."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from kiapi_zimage.catalog import validate
from zcli import kiapi


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_checkpoint_has_the_real_layout_and_is_deterministic(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from kiapi_zimage.testing import build_tiny_checkpoint

    files = digests(tiny_checkpoint)
    assert {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    } <= set(files)
    size = sum(p.stat().st_size for p in tiny_checkpoint.rglob("*") if p.is_file())
    assert 200e6 < size < 350e6  # the full-size VAE (168 MB) dominates
    assert digests(build_tiny_checkpoint(tmp_path / "again", seed=0)) == files
    other = digests(build_tiny_checkpoint(tmp_path / "other", seed=1))
    assert (
        other["vae/diffusion_pytorch_model.safetensors"]
        != files["vae/diffusion_pytorch_model.safetensors"]
    )
    validate(tiny_checkpoint)


def test_a_wrong_folder_fails_activation_with_a_clear_message(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    wrong = tmp_path / "not-a-checkpoint"
    wrong.mkdir()
    r = kiapi(tmp_path / "home", "activate", "zimage", "--path", str(wrong), check=False)
    assert r.returncode != 0 and "not a Z-Image checkpoint" in r.stderr, r.stderr
    # A transformer with layers missing passes a name check but not mflux's layer count.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    r = kiapi(tmp_path / "home", "activate", "zimage", "--path", str(broken), check=False)
    assert r.returncode != 0 and "transformer" in r.stderr, r.stderr


def test_activate_status_deactivate(tmp_path: Path, tiny_checkpoint: Path) -> None:
    home = tmp_path / "home"
    assert (
        "zimage/turbo: active"
        in kiapi(home, "activate", "zimage", "--path", str(tiny_checkpoint)).stdout
    )
    status = json.loads(kiapi(home, "status", "--json", "--url", "http://127.0.0.1:9").stdout)
    row = next(m for m in status["models"] if m["model"] == "zimage/turbo")
    assert row["active"] is True and row["weights"] == str(tiny_checkpoint.resolve())
    assert "deactivated" in kiapi(home, "deactivate", "z-image").stdout
    text = kiapi(home, "status", "--url", "http://127.0.0.1:9").stdout
    assert "not activated (run: kiapi activate zimage)" in text


def test_download_offline_explains_what_to_do(tmp_path: Path) -> None:
    r = kiapi(
        tmp_path / "home",
        "activate",
        "zimage",
        check=False,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert r.returncode != 0
    for words in ("Tongyi-MAI/Z-Image-Turbo", "hf auth login", "HF_TOKEN", "--path"):
        assert words in r.stderr, r.stderr


def test_memory_estimate_scales_with_the_checkpoint(tiny_checkpoint: Path) -> None:
    from kiapi_zimage.catalog import TURBO, estimate_memory_gb

    tiny = estimate_memory_gb(tiny_checkpoint, {})
    assert 0.5 <= tiny < 2 and TURBO.memory_for(tiny_checkpoint, {}) == tiny
    assert estimate_memory_gb(None, {}) == 24.5
    assert estimate_memory_gb(None, {"quantize": 4}) < estimate_memory_gb(None, {})
