"""Fixtures for the zimage tests: the plugin installed as a user installs it, one tiny
real-layout checkpoint, and one warm server for the session.

A tiny Z-Image generation still costs seconds of CPU (mflux's fixed 36-layer text encoder
over 512 padded tokens and its 30-layer transformer run in BF16, which mlx's CPU backend
multiplies without BLAS), so generations are few, small (64x64) and short (2 steps).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from zcli import OFFLINE, PLUGIN_DIR, kiapi

from kiapi_core.testing import LiveServer, start_server


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    """`kiapi install` the plugin (editable: this checkout is a workspace member, and an
    editable install keeps it so); twice, since installing must be idempotent."""
    home = tmp_path_factory.mktemp("install-home")
    for _ in range(2):
        done = kiapi(home, "install", "-e", str(PLUGIN_DIR), check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "installed: kiapi-zimage" in done.stdout
    listed = kiapi(home, "plugins", "--json", plugins=None)
    rows: list[dict[str, object]] = json.loads(listed.stdout)
    return rows


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kiapi_zimage.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "z-image-tiny")


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_checkpoint: Path,
    installed: list[dict[str, object]],
) -> Iterator[LiveServer]:
    """A warm kiapi with zimage active on the tiny checkpoint, shared by the session."""
    home = tmp_path_factory.mktemp("zimage-home")
    kiapi(home, "activate", "zimage", "--path", str(tiny_checkpoint))
    live = start_server(home, {**OFFLINE, "KIAPI_PLUGINS": "zimage"})
    yield live
    live.stop()
