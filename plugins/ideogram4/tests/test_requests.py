"""Request handling that needs no model run: validation, model names, weights, captions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from kiapi_core.app import create_app
from kiapi_core.settings import Settings

GENERATE = "/v1/image/ideogram4/generate"
VALIDATE = "/v1/image/ideogram4/validate"
CAPTION_OK = {
    "high_level_description": "A white notebook on a desk with the word KIAPI on its cover.",
    "style_description": {
        "aesthetics": "Clean, minimal product photography.",
        "lighting": "Soft daylight from a window on the left.",
        "photo": "50mm lens, shallow depth of field.",
        "medium": "photograph",
    },
    "compositional_deconstruction": {
        "background": "A warm wooden desk in soft window light.",
        "elements": [
            {
                "type": "text",
                "bbox": [420, 300, 560, 700],
                "text": "KIAPI",
                "desc": "Crisp black uppercase letters centred on the cover.",
            }
        ],
    },
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    home: Path = tmp_path_factory.mktemp("requests-home")
    with TestClient(create_app(Settings(home=home, plugins=["ideogram4"]))) as c:
        yield c


def _fields(response: Any) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {"/".join(map(str, e["loc"])): e["msg"] for e in response.json()["detail"]}


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"prompt": ""}, "body/prompt", "empty"),
        ({"prompt": "   \n"}, "body/prompt", "empty"),
        ({"prompt": {}}, "body/prompt", "empty"),
        ({}, "body/prompt", "required"),
        ({"prompt": "x", "width": 500}, "body/width", "multiple of 16"),
        ({"prompt": "x", "height": 4096}, "body/height", "256..2048"),
        ({"prompt": "x", "width": 240}, "body/width", "256..2048"),
        ({"prompt": "x", "width": -16}, "body/width", "256..2048"),
        ({"prompt": "x", "width": 512.0}, "body/width", "integer"),
        ({"prompt": "x", "width": "512"}, "body/width", "integer"),
        ({"prompt": "x", "quantize": 7}, "body/quantize", "3, 4, 5, 6, 8"),
        ({"prompt": "x", "quality": 0}, "body/quality", "greater than or equal to 1"),
        ({"prompt": "x", "quality": 101}, "body/quality", "less than or equal to 100"),
        ({"prompt": "x", "preset": "FAST"}, "body/preset", "V4_TURBO_12"),
        ({"prompt": "x", "format": "gif"}, "body/format", "png"),
        ({"prompt": "x", "mode": "later"}, "body/mode", "sync"),
        ({"prompt": "x", "seed": -1}, "body/seed", "0.."),
        ({"prompt": "x" * 40_000}, "body/prompt", "longer than"),
        (
            {"prompt": "x", "strict_caption_validation": "maybe"},
            "body/strict_caption_validation",
            "boolean",
        ),
    ],
)
def test_validation_names_the_field(
    client: TestClient, body: dict[str, Any], field: str, words: str
) -> None:
    errors = _fields(client.post(GENERATE, json=body))
    assert field in errors, errors
    assert words in errors[field], errors[field]


# JSON inside a string prompt: mflux parses it with Python's recursive json.
STRING_BOMB = '{"a":' * 5000 + "1" + "}" * 5000


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        (GENERATE, {"prompt": STRING_BOMB, "mode": "async"}, "nested deeper than 64"),
        (GENERATE, {"prompt": STRING_BOMB, "strict_caption_validation": True}, "nested deeper"),
        (GENERATE, {"prompt": '{"high_level_description": "a", "w": NaN}'}, "not finite"),
        (VALIDATE, {"prompt": STRING_BOMB}, "nested deeper than 64"),
        (VALIDATE, {"prompt": ' {"a": ' + "[" * 70 + "]" * 70 + "}"}, "nested deeper than 64"),
        (VALIDATE, {"prompt": '{"seed": ' + "7" * 5000 + "}"}, "4300 digits"),
        (VALIDATE, {"prompt": "x" * 40_000}, "longer than 32768"),
        (VALIDATE, {"prompt": {"high_level_description": "y" * 40_000}}, "longer than 32768"),
    ],
)
def test_a_caption_in_a_string_gets_the_body_rules(
    client: TestClient, path: str, body: dict[str, Any], words: str
) -> None:
    # Before the weights check (503 here): a bad prompt is a bad request, weights or not.
    errors = _fields(client.post(path, json=body))
    assert words in errors["body/prompt"], errors


def test_a_string_that_only_looks_like_json_is_plain_text(client: TestClient) -> None:
    report = client.post(VALIDATE, json={"prompt": "{not json, a poster"})
    assert report.status_code == 200 and not report.json()["is_json_caption"], report.text


def test_every_bad_field_is_listed_at_once(client: TestClient) -> None:
    errors = _fields(
        client.post(GENERATE, json={"prompt": "", "width": 500, "quantize": 7, "quality": 0})
    )
    assert {"body/prompt", "body/width", "body/quantize", "body/quality"} <= set(errors)


def test_unknown_model_lists_valid_names_and_aliases(client: TestClient) -> None:
    r = client.post(GENERATE, json={"prompt": "x", "model": "dall-e"})
    assert r.status_code == 400
    body = r.json()
    for name in ("fp8", "ideogram4", "ideogram-4"):
        assert name in body["detail"]
    assert body["valid_models"] == [
        {"name": "fp8", "aliases": ["ideogram4", "ideogram-4"], "default": True}
    ]


@pytest.mark.parametrize("name", [None, "fp8", "ideogram4", "ideogram-4", "IDEOGRAM4"])
def test_known_names_pass_to_the_weights_check(client: TestClient, name: str | None) -> None:
    # Without activated weights every known name ends at the 503 that says how to fix it.
    body = {"prompt": "x"} | ({"model": name} if name else {})
    r = client.post(GENERATE, json=body)
    assert r.status_code == 503
    assert "kiapi activate ideogram4" in r.json()["detail"]
    assert r.json()["command"] == "kiapi activate ideogram4"


def test_unknown_fields_are_accepted_and_ignored(client: TestClient) -> None:
    r = client.post(GENERATE, json={"prompt": "x", "negative_prompt": "blur", "n": 3})
    assert r.status_code == 503  # got past validation to the weights check


def test_strict_caption_validation_refuses_with_mflux_issues(client: TestClient) -> None:
    bad = {
        "high_level_description": "x",
        "compositional_deconstruction": {
            "background": "b",
            "elements": [{"type": "text", "bbox": [900, 0, 100, 50], "desc": "d"}],
        },
    }
    r = client.post(GENERATE, json={"prompt": bad, "strict_caption_validation": True})
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert detail["loc"] == ["body", "prompt"]
    assert detail["issues"], detail
    assert any("bbox" in issue for issue in detail["issues"])
    assert any("text" in issue for issue in detail["issues"])
    plain = client.post(GENERATE, json={"prompt": "a cat", "strict_caption_validation": True})
    assert plain.status_code == 400
    assert "plain prompt" in plain.json()["detail"]["issues"][0]


def test_validate_endpoint_reports_mflux_warnings(client: TestClient) -> None:
    ok = client.post("/v1/image/ideogram4/validate", json={"prompt": CAPTION_OK}).json()
    assert ok == {"valid": True, "is_json_caption": True, "warnings": []}
    plain = client.post("/v1/image/ideogram4/validate", json={"prompt": "a cat"}).json()
    assert plain["valid"] is False and plain["is_json_caption"] is False
    swapped = {
        **CAPTION_OK,
        "compositional_deconstruction": {
            **CAPTION_OK["compositional_deconstruction"],
            "elements": [{"type": "text", "bbox": [600, 300, 100, 700], "text": "K", "desc": "d"}],
        },
    }
    report = client.post("/v1/image/ideogram4/validate", json={"prompt": swapped}).json()
    assert report["valid"] is False and any("bbox" in w for w in report["warnings"])


def test_models_route(client: TestClient) -> None:
    assert client.get("/v1/image/ideogram4/models").json() == [
        {
            "name": "fp8",
            "family": "ideogram4",
            "domain": "image",
            "aliases": ["ideogram4", "ideogram-4"],
            "default": True,
            "features": ["text", "image", "typography", "json-caption"],
        }
    ]
