"""The real mflux Z-Image path, end to end over HTTP, on the tiny random-weight checkpoint.

Generations are few, small and short (see conftest.py, zcli.SMALL); tests that build on an earlier result
read it from the module's ``runs`` cache.
"""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from PIL import Image, ImageChops
from zcli import SMALL

from kiapi_core.testing import LiveServer, wait_for
from kiapi_core.testing.sse import job_events

GENERATE = "/v1/image/zimage/generate"
BASE = {"prompt": "a red cat on a wall", **SMALL}
runs: dict[str, Any] = {}


@pytest.fixture(scope="module")
def client(server: LiveServer) -> httpx.Client:
    return server.client(timeout=600)


def turbo(client: httpx.Client) -> dict[str, Any]:
    rows = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    return dict(rows["zimage/turbo"])


def test_kiapi_install_put_the_plugin_in_and_it_loads(installed: list[dict[str, Any]]) -> None:
    row = next(r for r in installed if r["name"] == "zimage")
    assert row["status"] == "loaded", row
    assert row["version"] == "0.1.0"


def test_sync_returns_raw_png_with_headers(client: httpx.Client) -> None:
    r = client.post(GENERATE, json={**BASE, "seed": 7})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    file_id, job_id = r.headers["x-kiapi-file-id"], r.headers["x-kiapi-job-id"]
    image = Image.open(io.BytesIO(r.content))
    assert image.format == "PNG" and image.size == (64, 64)
    runs["seed7"] = r.content
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["artifacts"] == [file_id]
    result = job["result"]
    assert result["file_id"] == file_id and result["image_bytes"] == len(r.content)
    assert (result["width"], result["height"], result["model"]) == (64, 64, "turbo")
    assert result["params"]["seed"] == 7 and result["params"]["steps"] == 2
    assert result["params"]["quantize"] is None and result["timings"]["total_s"] > 0
    assert turbo(client)["loads"] == 1


def test_same_seed_same_bytes_and_no_reload(client: httpx.Client) -> None:
    r = client.post(GENERATE, json={**BASE, "seed": 7}, headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    file_id = r.json()["result"]["file_id"]
    assert client.get(f"/v1/files/{file_id}/download").content == runs["seed7"]
    row = turbo(client)
    assert row["loads"] == 1 and row["resident"] is True


def test_other_seed_differs_and_webp_encodes(client: httpx.Client) -> None:
    r = client.post(GENERATE, json={**BASE, "seed": 8, "format": "webp", "quality": 80})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/webp"
    other = Image.open(io.BytesIO(r.content))
    assert other.format == "WEBP" and other.size == (64, 64)
    first = Image.open(io.BytesIO(runs["seed7"])).convert("RGB")
    diff = ImageChops.difference(first, other.convert("RGB"))
    assert max(hi for _, hi in diff.getextrema()) > 64  # another picture, not codec noise


def test_async_progress_is_monotonic_and_honest_through_the_decode(client: httpx.Client) -> None:
    r = client.post(GENERATE, json={**BASE, "steps": 3, "mode": "async", "seed": 11})
    assert r.status_code == 202
    job_id = r.json()["job_id"]
    # Previews have tests of their own; here, the job's states.
    events = [e.data for e in job_events(client, job_id) if e.event != "preview"]
    assert events[-1]["status"] == "succeeded"
    fractions = [e["progress"] for e in events if e["progress"] is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(e["status"] == "succeeded" for e in events if e["progress"] == 1.0)
    labels = [e["progress_label"] for e in events]
    assert "denoising 2/3" in labels or "denoising 3/3" in labels, labels
    for phase in ("decoding", "saving", "done"):
        assert phase in labels, labels
    decoding = next(e for e in events if e["progress_label"] == "decoding")
    assert decoding["progress"] < 0.97  # the decode (and saving) still lie ahead


def test_cancel_mid_denoise_leaves_nothing(client: httpx.Client) -> None:
    r = client.post(GENERATE, json={**BASE, "steps": 50, "mode": "async", "seed": 3})
    job_id = r.json()["job_id"]

    def denoising() -> bool:
        label = client.get(f"/v1/jobs/{job_id}").json()["progress_label"] or ""
        return label.startswith("denoising") and label not in ("denoising 1/50", "denoising 2/50")

    wait_for(denoising, timeout=300, interval=0.05)
    assert client.delete(f"/v1/jobs/{job_id}").status_code in (200, 202)
    job = wait_for(
        lambda: (
            (j := client.get(f"/v1/jobs/{job_id}").json())["status"]
            in ("canceled", "succeeded", "failed")
            and j
        ),
        timeout=300,
    )
    assert job["status"] == "canceled", job
    assert job["progress"] < 0.5 and job["artifacts"] == []
    assert client.get("/v1/files", params={"job_id": job_id}).json()["files"] == []
    assert turbo(client)["loads"] == 1  # the model survived the cancel, still warm


def test_openai_images_route_runs_zimage_jobs(client: httpx.Client) -> None:
    r = client.post(
        "/v1/images/generations",
        json={"model": "z-image", "prompt": "a cat", "size": "64x64", "quality": "low", "seed": 7},
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 1 and data[0]["b64_json"]
    job = client.get(f"/v1/jobs/{data[0]['kiapi_job_id']}").json()
    assert job["type"] == "zimage" and job["result"]["params"]["steps"] == 4
