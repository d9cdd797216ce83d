"""Fixtures for the ideogram4 tests: one tiny real-layout checkpoint and one warm server.

The checkpoint is built once per session and the server stays warm across tests, because
every real generation costs seconds of CPU (the full-size VAE decode dominates).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from i4cli import OFFLINE, kiapi

from kiapi_core.testing import LiveServer, start_server

CONTRACT_PATH = Path(__file__).resolve().parents[4] / "shared" / "ideogram4.openapi.json"


@pytest.fixture(scope="session")
def contract() -> dict[str, Any]:
    return dict(json.loads(CONTRACT_PATH.read_text()))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kiapi_ideogram4.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "ideogram-4-tiny")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[LiveServer]:
    """A warm kiapi with ideogram4 active on the tiny checkpoint, shared by the session."""
    home = tmp_path_factory.mktemp("ideogram4-home")
    kiapi(home, "activate", "ideogram4", "--path", str(tiny_checkpoint))
    live = start_server(home, {**OFFLINE, "KIAPI_PLUGINS": "ideogram4"})
    yield live
    live.stop()
