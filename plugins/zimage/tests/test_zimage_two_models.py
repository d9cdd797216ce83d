"""Two real models, one memory budget: ideogram4 and zimage on their tiny checkpoints in one
server (one worker process), alternating requests.

The budget counts max(the catalogs' estimates, the worker's real RSS). Set just below the two
estimates together, only one model fits: each request evicts the other (least recently used)
one, loads are counted in /v1/models, both are never resident, and no request is refused.
With room for both, both stay resident and alternating requests load nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from zcli import OFFLINE, kiapi

from kiapi_core.testing import LiveServer, start_server

kiapi_ideogram4 = pytest.importorskip("kiapi_ideogram4")

IDEOGRAM4 = ("/v1/image/ideogram4/generate", "ideogram4/fp8")
ZIMAGE = ("/v1/image/zimage/generate", "zimage/turbo")
BODIES = {
    IDEOGRAM4[0]: {"prompt": "a red cat", "width": 256, "height": 256, "preset": "V4_TURBO_12"},
    ZIMAGE[0]: {"prompt": "a red cat", "width": 64, "height": 64, "steps": 2},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict[str, Path]:
    from kiapi_ideogram4.testing import build_tiny_checkpoint

    ideogram = build_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "ideogram-4-tiny")
    return {"ideogram4": ideogram, "zimage": tiny_checkpoint}


def estimates(checkpoints: dict[str, Path]) -> dict[str, float]:
    from kiapi_ideogram4.catalog import FP8
    from kiapi_zimage.catalog import TURBO

    return {
        "ideogram4": FP8.memory_for(checkpoints["ideogram4"], {}),
        "zimage": TURBO.memory_for(checkpoints["zimage"], {}),
    }


def serve(home: Path, checkpoints: dict[str, Path], limit_gb: float) -> LiveServer:
    for family, path in checkpoints.items():
        kiapi(home, "activate", family, "--path", str(path), plugins=family)
    env = {**OFFLINE, "KIAPI_PLUGINS": "ideogram4,zimage", "KIAPI_MEMORY_LIMIT_GB": str(limit_gb)}
    return start_server(home, env)


@pytest.fixture
def server_for(tmp_path: Path, checkpoints: dict[str, Path]) -> Iterator[dict[str, LiveServer]]:
    started: dict[str, LiveServer] = {}
    yield started
    for live in started.values():
        live.stop()


def models(client: httpx.Client) -> dict[str, dict[str, object]]:
    rows = client.get("/v1/models").json()["data"]
    return {row["id"]: row for row in rows if row["id"] in (IDEOGRAM4[1], ZIMAGE[1])}


def alternate(client: httpx.Client, rounds: int) -> list[dict[str, dict[str, object]]]:
    """Run ideogram4, zimage, ideogram4, ...; the catalog rows after each request."""
    seen = []
    for i in range(rounds):
        path, _ = (IDEOGRAM4, ZIMAGE)[i % 2]
        r = client.post(path, json={**BODIES[path], "seed": i})
        assert r.status_code == 200, r.text  # never refused
        assert r.headers["content-type"] == "image/png"
        seen.append(models(client))
    return seen


def test_one_budget_for_one_model_evicts_the_least_recently_used(
    tmp_path: Path, checkpoints: dict[str, Path], server_for: dict[str, LiveServer]
) -> None:
    need = estimates(checkpoints)
    # Each fits alone, the two together do not.
    limit = round(sum(need.values()) - 0.05, 2)
    assert max(need.values()) < limit
    live = server_for["tight"] = serve(tmp_path / "home", checkpoints, limit)
    client = live.client(timeout=600)
    seen = alternate(client, 4)
    for i, rows in enumerate(seen):
        ran = (IDEOGRAM4, ZIMAGE)[i % 2][1]
        other = (ZIMAGE, IDEOGRAM4)[i % 2][1]
        assert rows[ran]["resident"] is True and rows[other]["resident"] is False, (i, rows)
    last = seen[-1]
    assert last[IDEOGRAM4[1]]["loads"] == 2 and last[ZIMAGE[1]]["loads"] == 2
    assert "evicting ideogram4/fp8 to make room for zimage/turbo" in live.output()
    assert "evicting zimage/turbo to make room for ideogram4/fp8" in live.output()


def test_room_for_both_keeps_both_resident(
    tmp_path: Path, checkpoints: dict[str, Path], server_for: dict[str, LiveServer]
) -> None:
    need = estimates(checkpoints)
    live = server_for["roomy"] = serve(tmp_path / "home", checkpoints, sum(need.values()) + 2)
    client = live.client(timeout=600)
    seen = alternate(client, 4)
    assert all(row["resident"] for row in seen[-1].values())
    assert [rows[IDEOGRAM4[1]]["loads"] for rows in seen] == [1, 1, 1, 1]
    assert [rows[ZIMAGE[1]]["loads"] for rows in seen[1:]] == [1, 1, 1]
    assert "evicting" not in live.output()
