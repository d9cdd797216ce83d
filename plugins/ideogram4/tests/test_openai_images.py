"""ideogram4 behind the host's OpenAI-compatible POST /v1/images/generations.

The mapping (quality → preset, size → width/height, output_compression → quality, seeds) is
checked without generating; one real request through the official `openai` client makes two
256x256 V4_TURBO_12 images on the tiny checkpoint, and the error cases generate nothing.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from kiapi_ideogram4.catalog import FP8
from kiapi_ideogram4.openai_images import prepare
from kiapi_ideogram4.settings import get_settings
from PIL import Image

from kiapi_core.images import ImageParamError, ImageRequest
from kiapi_core.images.routes import ImagesError, pick
from kiapi_core.plugins import build_registry
from kiapi_core.settings import Settings
from kiapi_core.testing import LiveServer


def request(**overrides: Any) -> ImageRequest:
    values: dict[str, Any] = {
        "prompt": "a red poster",
        "model": FP8,
        "n": 1,
        "width": None,
        "height": None,
        "quality": "auto",
        "output_format": "png",
        "output_compression": None,
        "seed": None,
        **overrides,
    }
    return ImageRequest(**values)


@pytest.mark.parametrize(
    ("quality", "preset"),
    [("low", "V4_TURBO_12"), ("medium", "V4_DEFAULT_20"), ("high", "V4_QUALITY_48")],
)
def test_quality_picks_the_preset(quality: str, preset: str) -> None:
    assert prepare(request(quality=quality))[0]["preset"] == preset


def test_auto_is_the_server_default_preset_and_size() -> None:
    (params,) = prepare(request())
    settings = get_settings()
    assert params["preset"] == settings.default_preset
    assert (params["width"], params["height"]) == (settings.default_width, settings.default_height)


def test_the_fields_map_onto_a_generate_request() -> None:
    (params,) = prepare(
        request(width=512, height=768, output_format="webp", output_compression=0, seed=9)
    )
    assert params["model"] == "fp8" and params["prompt"] == "a red poster"
    assert (params["width"], params["height"], params["format"]) == (512, 768, "webp")
    assert params["quality"] == 1  # OpenAI's 0 is Pillow's lowest, 1
    assert params["seed"] == 9 and params["quantize"] == get_settings().quantize
    assert prepare(request(output_compression=55))[0]["quality"] == 55


def test_each_image_gets_its_own_seed() -> None:
    assert [p["seed"] for p in prepare(request(n=3, seed=40))] == [40, 41, 42]
    drawn = [p["seed"] for p in prepare(request(n=4))]
    assert len(set(drawn)) == 4


@pytest.mark.parametrize(
    ("overrides", "param", "says"),
    [
        ({"width": 264, "height": 256}, "size", "size: width must be a multiple of 16"),
        ({"width": 256, "height": 4096}, "size", "size: height must be within 256..2048"),
        ({"width": 128, "height": 128}, "size", "must be within 256..2048 (got 128)"),
        ({"seed": 2**64 - 1, "n": 2}, "seed", "below 2**64"),
        ({"prompt": "x" * 40_000}, "prompt", "longer than"),
    ],
)
def test_values_ideogram4_cannot_take_name_the_openai_param(
    overrides: dict[str, Any], param: str, says: str
) -> None:
    with pytest.raises(ImageParamError) as caught:
        prepare(request(**overrides))
    assert caught.value.param == param and says in caught.value.message


@pytest.mark.parametrize("name", [None, "ideogram4", "fp8", "ideogram-4", "ideogram4/fp8", "FP8"])
def test_our_model_names_and_aliases_pick_ideogram4(tmp_path: Path, name: str | None) -> None:
    registry = build_registry(Settings(home=tmp_path, plugins=["ideogram4"]))
    generator, spec = pick(registry, name)
    assert generator.job_type == "ideogram4" and spec is FP8


def test_another_name_is_not_found(tmp_path: Path) -> None:
    registry = build_registry(Settings(home=tmp_path, plugins=["ideogram4"]))
    with pytest.raises(ImagesError) as caught:
        pick(registry, "dall-e-3")
    assert caught.value.status == 404 and caught.value.code == "model_not_found"
    assert "ideogram4/fp8 (also fp8, ideogram4, ideogram-4)" in caught.value.message


# -- the live server, through the official client --------------------------------------------
def client(server: LiveServer) -> openai.OpenAI:
    # No retries: a retried request would generate again.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def job_count(server: LiveServer) -> int:
    return len(httpx.get(f"{server.url}/v1/jobs?limit=500").json()["jobs"])


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"size": "250x256"}, openai.BadRequestError, "size"),
        ({"size": "4096x4096"}, openai.BadRequestError, "size"),
        ({"size": "square"}, openai.BadRequestError, "size"),
        ({"n": 5}, openai.BadRequestError, "n"),
        ({"output_format": "gif"}, openai.BadRequestError, "output_format"),
        ({"model": "gpt-image-1"}, openai.NotFoundError, "model"),
    ],
    ids=["size-step", "size-bounds", "size-syntax", "n", "format", "model"],
)
def test_bad_requests_raise_openai_errors_and_generate_nothing(
    server: LiveServer, kwargs: dict[str, Any], error: type[openai.APIStatusError], param: str
) -> None:
    before = job_count(server)
    with pytest.raises(error) as caught:
        client(server).images.generate(**{"model": "ideogram4", "prompt": "x", **kwargs})
    assert caught.value.param == param, caught.value.body
    assert job_count(server) == before


def test_models_list_shows_ideogram4_as_an_openai_model(server: LiveServer) -> None:
    models = {m.id: m for m in client(server).models.list()}
    fp8 = models["ideogram4/fp8"]
    assert fp8.object == "model" and fp8.owned_by == "ideogram4" and isinstance(fp8.created, int)
    assert (fp8.model_extra or {})["aliases"] == ["ideogram4", "ideogram-4"]


def test_two_images_through_the_official_client(server: LiveServer) -> None:
    result = client(server).images.generate(
        model="ideogram-4",
        prompt="a red poster that says HELLO",
        n=2,
        size="256x256",
        quality="low",
        response_format="b64_json",
        extra_body={"seed": 42},
    )
    assert result.data is not None and len(result.data) == 2
    images = [base64.b64decode(item.b64_json or "") for item in result.data]
    assert images[0] != images[1]
    for data in images:
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.size == (256, 256)
    extra = result.model_extra or {}
    assert extra["model"] == "ideogram4/fp8"
    for job_id, seed, data in zip(extra["kiapi_job_ids"], (42, 43), images, strict=True):
        job = httpx.get(f"{server.url}/v1/jobs/{job_id}").json()
        assert job["type"] == "ideogram4" and job["status"] == "succeeded"
        assert job["params"]["seed"] == seed and job["params"]["preset"] == "V4_TURBO_12"
        assert job["result"]["image_bytes"] == len(data)
        # The same file stays in the files API.
        file_id = job["artifacts"][0]
        assert httpx.get(f"{server.url}/v1/files/{file_id}/download").content == data
