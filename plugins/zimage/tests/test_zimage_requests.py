"""Request rules (422 naming the field for every rule mflux applies), unknown models, missing
weights, the catalog and OpenAPI: in-process, no generation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from kiapi_core import Settings
from kiapi_core.testing import create_app

GENERATE = "/v1/image/zimage/generate"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    home = tmp_path_factory.mktemp("zimage-requests")
    with TestClient(create_app(Settings(home=home, plugins=["zimage"]))) as c:
        yield c


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("width", 65, "multiple of 16"),
        ("height", 1000, "multiple of 16"),
        ("width", 48, "64..2048"),
        ("height", 4096, "64..2048"),
        ("steps", 0, "1..50"),
        ("steps", 51, "1..50"),
        ("seed", -1, "unsigned 64-bit"),
        ("seed", 2**64, "unsigned 64-bit"),
        ("quantize", 7, "3, 4, 5, 6, 8"),
        ("quality", 0, "greater than or equal to 1"),
        ("format", "gif", "'png', 'jpeg' or 'webp'"),
        ("prompt", "   ", "empty or blank"),
        ("prompt", "x" * 8193, "longer than 8192"),
        ("width", "64", "valid integer"),
    ],
)
def test_each_rule_is_a_422_naming_the_field(
    client: TestClient, field: str, value: object, words: str
) -> None:
    r = client.post(GENERATE, json={"prompt": "a cat", field: value})
    assert r.status_code == 422, r.text
    error = r.json()["detail"][0]
    assert error["loc"] == ["body", field] and words in error["msg"], error


def test_unknown_model_lists_the_valid_ones(client: TestClient) -> None:
    r = client.post(GENERATE, json={"prompt": "a cat", "model": "sdxl"})
    assert r.status_code == 400
    assert r.json()["valid_models"] == [
        {"name": "turbo", "aliases": ["zimage", "z-image", "z-image-turbo"], "default": True}
    ]


def test_missing_weights_name_the_command_and_nothing_downloads(client: TestClient) -> None:
    r = client.post(GENERATE, json={"prompt": "a cat", "model": "z-image-turbo"})
    assert r.status_code == 503
    assert r.json()["command"] == "kiapi activate zimage"


def test_models_and_the_capability_document(client: TestClient) -> None:
    assert [m["name"] for m in client.get("/v1/image/zimage/models").json()] == ["turbo"]
    doc = client.get("/v1/image/zimage/openapi.json").json()
    assert doc["x-kiapi-capability"] == "zimage" and doc["x-kiapi-domain"] == "image"
    post = doc["paths"][GENERATE]["post"]
    assert {"200", "202", "422", "503"} <= set(post["responses"])
    assert {"image/png", "image/webp", "image/jpeg", "application/json"} <= set(
        post["responses"]["200"]["content"]
    )
    props = doc["components"]["schemas"]["ZImageGenerateRequest"]["properties"]
    assert props["steps"]["default"] == 9 and "quantize" in props


def test_openai_size_refusal_names_the_openai_field(client: TestClient, tmp_path: Path) -> None:
    r = client.post(
        "/v1/images/generations", json={"model": "zimage", "prompt": "a cat", "size": "100x100"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "size" and "multiple of 16" in r.json()["error"]["message"]


def test_the_playground_finds_both_capabilities(tmp_path: Path) -> None:
    """The playground builds its forms from /v1/capabilities and each capability's OpenAPI."""
    pytest.importorskip("kiapi_ideogram4")
    settings = Settings(home=tmp_path, plugins=["ideogram4", "zimage"])
    with TestClient(create_app(settings)) as c:
        caps = {cap["name"]: cap for cap in c.get("/v1/capabilities").json()["data"]}
        assert caps["zimage"]["operations"]["generate"] == GENERATE
        assert caps["ideogram4"]["operations"]["generate"] == "/v1/image/ideogram4/generate"
        for cap in caps.values():
            doc = c.get(cap["openapi"]).json()
            body = doc["paths"][cap["operations"]["generate"]]["post"]["requestBody"]
            assert body["content"]["application/json"]["schema"]["$ref"]
        assert c.get("/playground").status_code == 200


def test_quantize_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # KIAPI_ZIMAGE_QUANTIZE=8 arrives as the string "8", which the Literal of ints refused.
    import pydantic
    from kiapi_zimage.settings import ZImageSettings

    monkeypatch.setenv("KIAPI_ZIMAGE_QUANTIZE", "8")
    assert ZImageSettings().quantize == 8
    monkeypatch.setenv("KIAPI_ZIMAGE_QUANTIZE", "2")
    with pytest.raises(pydantic.ValidationError, match="quantize"):
        ZImageSettings()
