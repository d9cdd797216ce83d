"""Activating weights (kiapi activate/deactivate/status), the memory budget, and BLAS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from i4cli import kiapi
from starlette.testclient import TestClient

from kiapi_core.app import create_app
from kiapi_core.settings import Settings
from kiapi_core.testing import LiveServer

GENERATE = "/v1/image/ideogram4/generate"


def test_a_wrong_folder_fails_activation_with_mflux_validator_message(tmp_path: Path) -> None:
    wrong = tmp_path / "not-a-checkpoint"
    wrong.mkdir()
    (wrong / "model_index.json").write_text("{}")
    r = kiapi(tmp_path / "home", "activate", "ideogram4", "--path", str(wrong), check=False)
    assert r.returncode != 0
    assert "not a usable checkpoint" in r.stderr and "FP8 checkpoint layout" in r.stderr
    status = json.loads(
        kiapi(tmp_path / "home", "status", "--json", "--url", "http://127.0.0.1:9").stdout
    )
    assert status["models"][0]["active"] is False


def test_activate_status_deactivate(tmp_path: Path, tiny_checkpoint: Path) -> None:
    home = tmp_path / "home"
    out = kiapi(home, "activate", "ideogram4", "--path", str(tiny_checkpoint)).stdout
    assert "ideogram4/fp8: active" in out
    status = json.loads(kiapi(home, "status", "--json", "--url", "http://127.0.0.1:9").stdout)
    row = status["models"][0]
    assert row["model"] == "ideogram4/fp8" and row["active"] is True
    assert row["weights"] == str(tiny_checkpoint.resolve())
    assert status["server"] is None and row["resident"] is None
    text = kiapi(home, "status", "--url", "http://127.0.0.1:9").stdout
    assert "ideogram4/fp8: active" in text and "not reachable" in text
    assert "deactivated" in kiapi(home, "deactivate", "ideogram-4").stdout
    text = kiapi(home, "status", "--url", "http://127.0.0.1:9").stdout
    assert "not activated (run: kiapi activate ideogram4)" in text


def test_download_without_access_explains_how_to_get_it(tmp_path: Path) -> None:
    # Offline here, as for a user without a token or approved access: the message must say
    # how to request access and log in, and offer --path.
    r = kiapi(
        tmp_path / "home",
        "activate",
        "ideogram4",
        check=False,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert r.returncode != 0
    for words in ("ideogram-ai/ideogram-4-fp8", "request access", "hf auth login", "--path"):
        assert words in r.stderr, r.stderr


def test_status_reports_residency_from_a_running_server(server: LiveServer) -> None:
    status = json.loads(kiapi(server.home, "status", "--json", "--url", server.url).stdout)
    assert status["server"] == server.url
    assert isinstance(status["models"][0]["resident"], bool)


def test_requests_respect_the_memory_budget(tmp_path: Path, tiny_checkpoint: Path) -> None:
    home = tmp_path / "home"
    kiapi(home, "activate", "ideogram4", "--path", str(tiny_checkpoint))
    settings = Settings(home=home, plugins=["ideogram4"], memory_limit_gb=0.2)
    with TestClient(create_app(settings)) as client:
        r = client.post(GENERATE, json={"prompt": "x", "width": 256, "height": 256})
        assert r.status_code == 503, r.text
        assert (
            "memory budget" in r.json()["detail"] and "KIAPI_MEMORY_LIMIT_GB" in r.json()["detail"]
        )
        job = client.get(f"/v1/jobs/{r.json()['job_id']}").json()
        assert job["status"] == "failed"


def test_memory_estimate_scales_with_the_checkpoint(tiny_checkpoint: Path) -> None:
    from kiapi_ideogram4.catalog import FP8, estimate_memory_gb

    tiny = estimate_memory_gb(tiny_checkpoint, {})
    assert 0.5 <= tiny < 2
    assert estimate_memory_gb(None, {}) == 28.5  # the published 26-28 GiB peak, plus margin
    assert estimate_memory_gb(None, {"quantize": 4}) < estimate_memory_gb(None, {})
    assert FP8.memory_for(tiny_checkpoint, {}) == tiny


def test_openblas_is_loaded_before_mlx_and_logged() -> None:
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO)\n"
        "from kiapi_core import ensure_fast_blas\n"
        "print(ensure_fast_blas('auto'))\n"
        "import mlx.core\n"
        "print(open('/proc/self/maps').read().count('libopenblas'))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    chosen, maps = r.stdout.splitlines()
    assert chosen.startswith("OpenBLAS"), chosen
    assert int(maps) > 0
    assert "BLAS: OpenBLAS" in r.stderr
    bundled = subprocess.run(
        [sys.executable, "-c", code.replace("'auto'", "'bundled'")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert bundled[0].startswith("mlx's bundled reference BLAS")
