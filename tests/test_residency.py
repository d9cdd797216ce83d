"""Residency control on a real server (embedded backend, worker process): keep_alive per
job, loading ahead, unloading now, ``expires_at`` and ``/health`` readiness.

The kiapi-pair test plugin's two fake models load through the real ModelManager in
KIAPI_PAIR_LOAD_S seconds. The celery side is tests/test_residency_routing.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import LiveServer, install_plugin, start_server, wait_for

RUN = "/v1/text/pair/run"
TTL_S = 2.0
ENV = {
    "KIAPI_PLUGINS": "pair",
    "KIAPI_SWEEP_INTERVAL_S": "0.2",
    "KIAPI_MODEL_IDLE_TTL_S": str(TTL_S),
    "KIAPI_WORKERS": "1",
    "KIAPI_MAX_KEEP_ALIVE_S": "3600",
}


@pytest.fixture(scope="module", params=["process", "thread"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """The worker process (the default: models live there) and thread mode (in the server)."""
    install_plugin("pair")
    env = {**ENV, "KIAPI_WORKER_MODE": request.param}
    live = start_server(tmp_path_factory.mktemp("residency") / "home", env)
    yield live
    live.stop()


@pytest.fixture
def c(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def model(c: httpx.Client, name: str) -> dict[str, Any]:
    rows = c.get("/v1/models").json()["data"]
    return next(r for r in rows if r["id"] == f"pair/{name}")


def unload(c: httpx.Client, name: str) -> None:
    r = c.delete(f"/v1/models/pair/{name}/resident")
    assert r.status_code == 200, r.text
    assert r.json()["resident"] is False


def terminal(c: httpx.Client, job_id: str) -> dict[str, Any]:
    done: dict[str, Any] = wait_for(
        lambda: (
            (j := c.get(f"/v1/jobs/{job_id}").json())["status"]
            in ("succeeded", "failed", "canceled")
            and j
        )
    )
    return done


def test_keep_alive_0_unloads_the_model_after_its_job(c: httpx.Client) -> None:
    r = c.post(RUN, json={"model": "pair-b", "keep_alive": 0})
    assert r.status_code == 200, r.text
    assert r.json()["keep_alive"] == 0
    loads = model(c, "pair-b")["loads"]
    wait_for(lambda: not model(c, "pair-b")["resident"], timeout=10)
    # And again through the header: the next job loads it anew.
    r = c.post(RUN, json={"model": "pair-b"}, headers={"X-Kiapi-Keep-Alive": "0"})
    assert r.json()["result"]["loaded"] is True
    wait_for(lambda: not model(c, "pair-b")["resident"], timeout=10)
    assert model(c, "pair-b")["loads"] == loads + 1


def test_keep_alive_minus_1_survives_the_idle_sweep(c: httpx.Client) -> None:
    r = c.post(RUN, json={"model": "pair-a"}, headers={"X-Kiapi-Keep-Alive": "-1"})
    assert r.status_code == 200, r.text
    assert r.json()["keep_alive"] == -1
    # pair-b with the server's TTL: its unload shows the idle sweep ran meanwhile.
    c.post(RUN, json={"model": "pair-b"})
    assert model(c, "pair-b")["resident"]
    wait_for(lambda: not model(c, "pair-b")["resident"], timeout=TTL_S * 5)
    kept = model(c, "pair-a")
    assert kept["resident"] and kept["expires_at"] is None
    unload(c, "pair-a")


def test_load_warms_the_model_so_the_next_job_has_no_load(c: httpx.Client) -> None:
    unload(c, "pair-b")
    r = c.post("/v1/models/pair/pair-b/load", json={"keep_alive": 600})
    assert r.status_code == 202, r.text
    assert r.json()["type"] == "kiapi.load" and r.headers["location"].endswith(r.json()["id"])
    job = terminal(c, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["loaded"] is True
    row = model(c, "pair-b")
    assert row["resident"] and row["expires_at"] > time.time() + 300
    used = c.post(RUN, json={"model": "pair-b"}).json()
    assert used["result"]["loaded"] is False
    # Loading what is resident loads nothing (and renews its keep-alive).
    again = terminal(c, c.post("/v1/models/pair/pair-b/load").json()["id"])
    assert again["result"]["loaded"] is False
    unload(c, "pair-b")


def test_unload_is_409_while_a_job_uses_the_model_and_200_after(c: httpx.Client) -> None:
    r = c.post(RUN, json={"model": "pair-a", "mode": "async", "steps": 40, "delay_s": 0.05})
    job_id = r.json()["job_id"]
    wait_for(lambda: model(c, "pair-a")["in_use"] == 1, timeout=20)
    busy = c.delete("/v1/models/pair/pair-a/resident")
    assert busy.status_code == 409, busy.text
    assert "in use" in busy.json()["detail"]
    assert terminal(c, job_id)["status"] == "succeeded"
    unload(c, "pair-a")
    assert not model(c, "pair-a")["resident"]


def test_unknown_model_is_404(c: httpx.Client) -> None:
    for r in (c.delete("/v1/models/pair/nope/resident"), c.post("/v1/models/nope/x/load")):
        assert r.status_code == 404, r.text
        assert "no model" in r.json()["detail"]


def test_expires_at_moves_with_use(c: httpx.Client) -> None:
    c.post(RUN, json={"model": "pair-a", "keep_alive": 30})
    first = model(c, "pair-a")["expires_at"]
    assert first is not None and time.time() < first <= time.time() + 30
    time.sleep(0.3)
    c.post(RUN, json={"model": "pair-a", "keep_alive": 30})
    second = model(c, "pair-a")["expires_at"]
    assert second > first
    # The last request's keep_alive wins (as Ollama's).
    c.post(RUN, json={"model": "pair-a", "keep_alive": 600})
    assert model(c, "pair-a")["expires_at"] > second + 500
    unload(c, "pair-a")


@pytest.mark.parametrize(
    ("body", "headers", "loc"),
    [
        ({"keep_alive": -0.5}, {}, ["body", "keep_alive"]),
        ({"keep_alive": 7200}, {}, ["body", "keep_alive"]),
        ({}, {"X-Kiapi-Keep-Alive": "soon"}, ["header", "X-Kiapi-Keep-Alive"]),
        ({}, {"X-Kiapi-Keep-Alive": "-2"}, ["header", "X-Kiapi-Keep-Alive"]),
        ({}, {"X-Kiapi-Keep-Alive": "2h"}, ["header", "X-Kiapi-Keep-Alive"]),
    ],
)
def test_a_bad_keep_alive_is_a_422_naming_the_field_and_the_rule(
    c: httpx.Client, body: dict[str, Any], headers: dict[str, str], loc: list[str]
) -> None:
    for path, payload in (
        (RUN, {"model": "pair-a", **body}),
        ("/v1/models/pair/pair-a/load", body),
    ):
        r = c.post(path, json=payload, headers=headers)
        assert r.status_code == 422, r.text
        (problem,) = r.json()["detail"]
        assert problem["loc"] == loc
        assert "KIAPI_MAX_KEEP_ALIVE_S=3600" in problem["msg"] and "-1" in problem["msg"]


def test_a_duration_header_is_seconds(c: httpx.Client) -> None:
    r = c.post(RUN, json={"model": "pair-a"}, headers={"X-Kiapi-Keep-Alive": "5m"})
    assert r.json()["keep_alive"] == 300


def test_readiness_is_busy_while_every_slot_runs_a_job(c: httpx.Client) -> None:
    assert c.get("/health").json()["readiness"] == "ready"
    r = c.post(RUN, json={"model": "pair-a", "mode": "async", "steps": 30, "delay_s": 0.05})
    wait_for(lambda: c.get("/health").json()["readiness"] == "busy", timeout=20)
    terminal(c, r.json()["job_id"])
    assert c.get("/health").json()["readiness"] == "ready"


def test_readiness_is_starting_while_the_first_load_runs(tmp_path: Path) -> None:
    slow = start_server(tmp_path / "home", {**ENV, "KIAPI_PAIR_LOAD_S": "3"})
    try:
        with httpx.Client(base_url=slow.url, timeout=30) as c:
            assert c.get("/health").json()["readiness"] == "ready"
            job_id = c.post("/v1/models/pair/pair-a/load").json()["id"]
            wait_for(lambda: c.get("/health").json()["readiness"] == "starting", timeout=20)
            assert terminal(c, job_id)["status"] == "succeeded"
            assert c.get("/health").json()["readiness"] == "ready"
    finally:
        slow.stop()


def test_ideogram4_and_zimage_take_keep_alive_in_the_body(tmp_path: Path) -> None:
    live = start_server(tmp_path / "home", {"KIAPI_PLUGINS": "ideogram4,zimage"})
    try:
        with httpx.Client(base_url=live.url, timeout=30) as c:
            schemas = c.get("/openapi.json").json()["components"]["schemas"]
            for path in ("/v1/image/ideogram4/generate", "/v1/image/zimage/generate"):
                bad = c.post(path, json={"prompt": "a cat", "keep_alive": -3})
                assert bad.status_code == 422, bad.text
                assert bad.json()["detail"][0]["loc"] == ["body", "keep_alive"]
                # Accepted: what stops this one is the weights, not activated here.
                ok = c.post(path, json={"prompt": "a cat", "keep_alive": -1})
                assert ok.status_code == 503, ok.text
            props = [
                s["properties"] for s in schemas.values() if "keep_alive" in s.get("properties", {})
            ]
            assert len(props) >= 3  # both generate requests and LoadRequest
    finally:
        live.stop()
