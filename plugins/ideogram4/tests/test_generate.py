"""The real mflux path, end to end over HTTP, on the tiny random-weight checkpoint.

Generations are few and shared (each costs ~12 s of CPU, mostly the full-size VAE decode);
tests that build on an earlier result read it from the module's ``runs`` cache.
"""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import jsonschema
import pytest
from PIL import Image, ImageChops

from kiapi_core.testing import LiveServer, wait_for
from kiapi_core.testing.sse import job_events

GENERATE = "/v1/image/ideogram4/generate"
CAPTION = {
    "high_level_description": "A red poster that says HELLO.",
    "style_description": {
        "aesthetics": "bold, minimal",
        "lighting": "soft studio light",
        "medium": "digital illustration",
        "art_style": "flat vector",
        "color_palette": ["#FF0000", "#FFFFFF"],
    },
    "compositional_deconstruction": {
        "background": "a plain white wall",
        "elements": [
            {
                "type": "text",
                "bbox": [100, 150, 300, 850],
                "text": "HELLO",
                "desc": "large bold sans-serif letters",
                "color_palette": ["#FF0000"],
            },
            {"type": "obj", "bbox": [400, 300, 900, 700], "desc": "a red poster"},
        ],
    },
}
BASE = {"prompt": CAPTION, "width": 256, "height": 256, "preset": "V4_TURBO_12"}

runs: dict[str, Any] = {}


def schema_validator(contract: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    """A validator for one contract component, resolving its #/components/... refs."""
    root = {"components": contract["components"], "$ref": f"#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(root)


def fp8_loads(client: httpx.Client) -> dict[str, Any]:
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    return dict(models["ideogram4/fp8"])


@pytest.fixture(scope="module")
def client(server: LiveServer) -> httpx.Client:
    return server.client(timeout=600)


def test_sync_returns_raw_png_with_headers(client: httpx.Client, contract: dict[str, Any]) -> None:
    r = client.post(GENERATE, json={**BASE, "seed": 7})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    file_id, job_id = r.headers["x-kiapi-file-id"], r.headers["x-kiapi-job-id"]
    image = Image.open(io.BytesIO(r.content))
    assert image.format == "PNG" and image.size == (256, 256)
    runs["seed7_png"] = r.content

    job = client.get(f"/v1/jobs/{job_id}").json()
    schema_validator(contract, "JobImageResponse").validate(job)
    assert (
        job["status"] == "succeeded" and job["progress"] == 1.0 and job["progress_label"] == "done"
    )
    assert job["artifacts"] == [file_id]
    result = job["result"]
    assert result["file_id"] == file_id and result["image_bytes"] == len(r.content)
    assert (result["width"], result["height"]) == (256, 256)
    assert result["model"] == "fp8" and result["prompt"] == CAPTION
    params = result["params"]
    assert params["seed"] == 7 and params["preset"] == "V4_TURBO_12" and params["steps"] == 12
    assert params["quantize"] is None and params["format"] == "png" and params["quality"] == 90
    assert result["timings"]["total_s"] > 0
    assert "safety filter" in result["safety_filter_note"]
    assert result["caption_warnings"] == []  # a caption mflux's verifier accepts as is
    meta = client.get(f"/v1/files/{file_id}").json()
    assert meta["job_id"] == job_id and meta["content_type"] == "image/png"
    assert fp8_loads(client)["loads"] == 1


def test_same_seed_gives_identical_bytes_as_json(
    client: httpx.Client, contract: dict[str, Any]
) -> None:
    r = client.post(GENERATE, json={**BASE, "seed": 7}, headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    job = r.json()
    schema_validator(contract, "JobImageResponse").validate(job)
    download = client.get(f"/v1/files/{job['result']['file_id']}/download")
    assert download.status_code == 200
    assert download.content == runs["seed7_png"]
    # The model stayed warm: the second request loaded nothing.
    assert fp8_loads(client)["loads"] == 1
    assert fp8_loads(client)["resident"] is True


def test_accept_image_wildcard_and_q_values_get_raw_bytes(client: httpx.Client) -> None:
    r = client.post(
        GENERATE,
        json={**BASE, "seed": 7},
        headers={"Accept": "application/json;q=0.5, image/*;q=0.9"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == runs["seed7_png"]


def test_other_seed_differs_and_webp_encodes(client: httpx.Client) -> None:
    r = client.post(GENERATE, json={**BASE, "seed": 8, "format": "webp", "quality": 80})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/webp"
    other = Image.open(io.BytesIO(r.content))
    assert other.format == "WEBP" and other.size == (256, 256)
    first = Image.open(io.BytesIO(runs["seed7_png"])).convert("RGB")
    diff = ImageChops.difference(first, other.convert("RGB"))
    assert max(hi for _, hi in diff.getextrema()) > 64  # a different picture, not codec noise


def test_jpeg_quality_encodes_the_same_picture(client: httpx.Client) -> None:
    r = client.post(
        GENERATE,
        json={**BASE, "seed": 7, "format": "jpeg", "quality": 60},
        headers={"Accept": "application/json"},
    )
    job = r.json()
    assert job["result"]["params"]["quality"] == 60
    data = client.get(f"/v1/files/{job['result']['file_id']}/download").content
    jpeg = Image.open(io.BytesIO(data))
    assert jpeg.format == "JPEG" and jpeg.size == (256, 256)
    png = Image.open(io.BytesIO(runs["seed7_png"])).convert("RGB")
    diff = ImageChops.difference(png, jpeg.convert("RGB")).convert("L")
    mean = sum(i * n for i, n in enumerate(diff.histogram())) / (256 * 256)
    assert mean < 25  # lossy, but the same image


def _events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    # Previews have their own tests (test_generate_previews.py).
    return [e.data for e in job_events(client, job_id) if e.event != "preview"]


def test_async_then_poll_progress_and_download(
    client: httpx.Client, contract: dict[str, Any]
) -> None:
    r = client.post(
        GENERATE, json={**BASE, "prompt": "a poster that says HELLO", "mode": "async", "seed": 11}
    )
    assert r.status_code == 202
    accepted = r.json()
    schema_validator(contract, "AsyncJobResponse").validate(accepted)
    job_id = accepted["job_id"]
    events = _events(client, job_id)
    assert events[-1]["status"] == "succeeded"
    for event in events:
        schema_validator(contract, "JobImageResponse").validate(event)
    fractions = [e["progress"] for e in events if e["progress"] is not None]
    assert fractions == sorted(fractions), fractions
    assert fractions[-1] == 1.0
    # Honest progress: 1.0 only once the job has succeeded (image decoded and saved).
    assert all(e["status"] == "succeeded" for e in events if e["progress"] == 1.0)
    labels = [e["progress_label"] for e in events]
    assert any(label.startswith("denoising") for label in labels), labels
    for phase in ("decoding", "saving", "done"):
        assert phase in labels, labels
    decoding = next(e for e in events if e["progress_label"] == "decoding")
    assert decoding["progress"] < 0.9  # the long decode still lies ahead
    job = client.get(f"/v1/jobs/{job_id}").json()
    result = job["result"]
    assert any("plain prompt" in w for w in result["caption_warnings"])
    download = client.get(f"/v1/files/{result['file_id']}/download")
    assert download.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(download.content)).size == (256, 256)


def test_cancel_mid_denoise_leaves_nothing(client: httpx.Client) -> None:
    r = client.post(
        GENERATE,
        json={
            **BASE,
            "width": 512,
            "height": 512,
            "preset": "V4_QUALITY_48",
            "mode": "async",
            "seed": 3,
        },
    )
    job_id = r.json()["job_id"]

    def denoising() -> bool:
        label = client.get(f"/v1/jobs/{job_id}").json()["progress_label"]
        return label.startswith("denoising") and label != "denoising 1/48"

    wait_for(denoising, timeout=300, interval=0.02)
    cancel = client.delete(f"/v1/jobs/{job_id}")
    assert cancel.status_code in (200, 202)
    job = wait_for(
        lambda: (
            (j := client.get(f"/v1/jobs/{job_id}").json())["status"]
            in ("canceled", "succeeded", "failed")
            and j
        ),
        timeout=300,
    )
    assert job["status"] == "canceled", job
    assert job["progress"] < 0.5
    assert job["artifacts"] == []
    assert client.get("/v1/files", params={"job_id": job_id}).json()["files"] == []


def test_quantize_override_is_transient(client: httpx.Client) -> None:
    before = fp8_loads(client)
    r = client.post(
        GENERATE, json={**BASE, "seed": 7, "quantize": 8}, headers={"Accept": "application/json"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["result"]["params"]["quantize"] == 8
    after = fp8_loads(client)
    assert after["resident"] is True
    assert after["loads"] == before["loads"] == 1  # the resident fp8 model was not reloaded
    assert after["transient_loads"] == before["transient_loads"] + 1
    residents = client.get("/health").json()
    assert residents["models"]["transient"] == 0  # freed after the run
    # The resident model still answers, unchanged.
    again = client.post(GENERATE, json={**BASE, "seed": 7})
    assert again.content == runs["seed7_png"]
    assert fp8_loads(client)["loads"] == 1


def test_timings_exclude_queue_time(client: httpx.Client) -> None:
    started = time.monotonic()
    r = client.post(GENERATE, json={**BASE, "seed": 7}, headers={"Accept": "application/json"})
    wall = time.monotonic() - started
    assert 0 < r.json()["result"]["timings"]["total_s"] <= wall
