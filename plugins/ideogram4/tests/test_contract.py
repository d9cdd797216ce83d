"""What we serve holds the promised ideogram4 contract unchanged (extensions only add)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from contract import contract_differences
from openapi_spec_validator import validate
from starlette.testclient import TestClient

from kiapi_core.app import create_app
from kiapi_core.settings import Settings

GENERATE = "/v1/image/ideogram4/generate"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    home: Path = tmp_path_factory.mktemp("contract-home")
    with TestClient(create_app(Settings(home=home, plugins=["ideogram4"]))) as c:
        yield c


def test_capability_document_holds_the_contract(
    client: TestClient, contract: dict[str, Any]
) -> None:
    served = client.get("/v1/image/ideogram4/openapi.json").json()
    assert contract_differences(contract, served) == []
    assert served["x-kiapi-capability"] == "ideogram4"
    assert served["x-kiapi-domain"] == "image"
    assert served["x-kiapi-root-openapi"] == "/openapi.json"
    validate(served)


def test_root_document_holds_the_contract(client: TestClient, contract: dict[str, Any]) -> None:
    served = client.get("/openapi.json").json()
    assert contract_differences(contract, served) == []
    validate(served)


def test_descriptions_are_ours_and_bbox_order_is_what_mflux_checks(
    client: TestClient, contract: dict[str, Any]
) -> None:
    served = client.get("/v1/image/ideogram4/openapi.json").json()
    prompt_doc = served["components"]["schemas"]["GenerateRequest"]["properties"]["prompt"][
        "description"
    ]
    assert "[y_min, x_min, y_max, x_max]" in prompt_doc
    assert "[x1,y1,x2,y2]" not in prompt_doc.replace(" ", "")
    ours = served["paths"][GENERATE]["post"]["description"]
    assert ours != contract["paths"][GENERATE]["post"]["description"]


def test_extensions_are_documented(client: TestClient) -> None:
    served = client.get("/v1/image/ideogram4/openapi.json").json()
    responses = served["paths"][GENERATE]["post"]["responses"]
    for code in ("406", "413", "415", "429"):
        assert code in responses
    props = served["components"]["schemas"]["ImageResponse"]["properties"]
    assert "caption_warnings" in props
    assert "queue_position" in served["components"]["schemas"]["JobImageResponse"]["properties"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["components"]["schemas"]["GenerateRequest"]["properties"]["width"].update(
            minimum=256
        ),
        lambda d: d["components"]["schemas"]["GenerateRequest"]["properties"]["preset"][
            "enum"
        ].pop(),
        lambda d: d["components"]["schemas"]["GenerateRequest"].update(additionalProperties=False),
        lambda d: d["components"]["schemas"]["ImageResponse"]["required"].remove("timings"),
        lambda d: d["paths"][GENERATE]["post"]["responses"].pop("504"),
        lambda d: d["paths"][GENERATE]["post"]["responses"]["200"]["content"].pop("image/webp"),
        lambda d: d["components"]["schemas"]["GenerateRequest"]["properties"]["quality"].update(
            default=80
        ),
        lambda d: d["components"]["schemas"].pop("_Timings"),
        lambda d: d["components"]["schemas"]["JobStatus"]["enum"].append("paused"),
    ],
)
def test_the_comparison_catches_changes(
    client: TestClient, contract: dict[str, Any], mutate: Any
) -> None:
    served = copy.deepcopy(client.get("/v1/image/ideogram4/openapi.json").json())
    mutate(served)
    assert contract_differences(contract, served) != []
