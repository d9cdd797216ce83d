"""GET /openapi.json and the per-capability documents: valid OpenAPI 3.1, complete, merged."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from referencing.exceptions import Unresolvable
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from kiapi_core import Capability, hookimpl
from kiapi_core.app import create_app
from kiapi_core.settings import Settings
from kiapi_core.web.openapi import HTTP_METHODS

HOST_PATHS = {
    "/health": {"get"},
    "/openapi.json": {"get"},
    "/v1/models": {"get"},
    "/v1/jobs": {"get"},
    "/v1/jobs/{job_id}": {"get", "delete", "patch"},
    "/v1/jobs/{job_id}/retry": {"post"},
    "/v1/jobs/{job_id}/events": {"get"},
    "/v1/files": {"get", "post"},
    "/v1/files/{file_id}": {"get", "delete"},
    "/v1/files/{file_id}/download": {"get"},
}
HOST_SCHEMAS = {"Error", "Health", "Job", "JobList", "AsyncJobResponse", "FileInfo", "FileList"}


def valid_31(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1")
    validate(doc, cls=OpenAPIV31SpecValidator)


def methods(item: dict[str, Any]) -> set[str]:
    return {m for m in item if m in HTTP_METHODS}


@pytest.fixture
def everything(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """Every installed plugin, as `kiapi serve` would load them."""
    with TestClient(create_app(make_settings(plugins=None))) as c:
        yield c


def test_the_validator_catches_a_dangling_ref() -> None:
    # The capability documents are checked for self-containment by this validator; make sure
    # it really resolves references rather than only checking the shape.
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "paths": {"/a": {"get": {"responses": {"200": {"$ref": "#/components/responses/No"}}}}},
    }
    with pytest.raises((OpenAPIValidationError, Unresolvable)):
        validate(doc, cls=OpenAPIV31SpecValidator)


def test_the_root_document_is_valid_and_has_the_host_and_echo(client: TestClient) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    valid_31(doc)
    for path, expected in HOST_PATHS.items():
        assert methods(doc["paths"][path]) == expected, path
    assert set(doc["components"]["schemas"]) >= HOST_SCHEMAS
    assert methods(doc["paths"]["/v1/text/echo/run"]) == {"post"}
    assert methods(doc["paths"]["/v1/text/echo/openapi.json"]) == {"get"}
    assert {"EchoRequest", "EchoJob"} <= set(doc["components"]["schemas"])
    # Components shared with the host are referenced, not redefined under another name.
    run = doc["paths"]["/v1/text/echo/run"]["post"]
    assert run["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/AsyncJobResponse"
    }


def test_every_installed_plugin_merges_into_one_valid_document(everything: TestClient) -> None:
    health = everything.get("/health").json()
    loaded = {p["name"] for p in health["plugins"] if p["status"] == "loaded"}
    assert health["status"] == "ok", [p for p in health["plugins"] if p["errors"]]
    assert {"kiapi.meta", "kiapi.jobs", "kiapi.files", "echo"} <= loaded
    doc = everything.get("/openapi.json").json()
    valid_31(doc)
    for plugin in health["plugins"]:
        for capability in plugin["capabilities"]:
            domain, name = capability.split("/")
            assert f"/v1/{domain}/{name}/openapi.json" in doc["paths"]


def test_every_served_route_is_documented_and_every_documented_path_served(
    everything: TestClient,
) -> None:
    doc = everything.get("/openapi.json").json()
    served: dict[str, set[str]] = {}
    for route in everything.app.routes:  # type: ignore[attr-defined]
        assert isinstance(route, Route), route
        served.setdefault(route.path, set()).update(
            m.lower() for m in (route.methods or ()) if m != "HEAD"
        )
    documented = {path: methods(item) for path, item in doc["paths"].items()}
    assert served == documented


def test_every_capability_document_is_valid_and_self_contained(everything: TestClient) -> None:
    root = everything.get("/openapi.json").json()
    capability_docs = [
        p for p in root["paths"] if p.endswith("/openapi.json") and p != "/openapi.json"
    ]
    assert "/v1/text/echo/openapi.json" in capability_docs
    for path in capability_docs:
        _, _, domain, name, _ = path.split("/")
        response = everything.get(path)
        assert response.status_code == 200, path
        doc = response.json()
        valid_31(doc)
        assert doc["x-kiapi-capability"] == name
        assert doc["x-kiapi-domain"] == domain
        assert doc["x-kiapi-root-openapi"] == "/openapi.json"
        prefix = f"/v1/{domain}/{name}/"
        assert doc["paths"] and all(p.startswith(prefix) for p in doc["paths"])
        assert doc["paths"] == {p: i for p, i in root["paths"].items() if p.startswith(prefix)}


def test_the_echo_capability_document(client: TestClient) -> None:
    doc = client.get("/v1/text/echo/openapi.json").json()
    assert set(doc["paths"]) == {
        "/v1/text/echo/run",
        "/v1/text/echo/models",
        "/v1/text/echo/openapi.json",
    }
    assert doc["info"]["title"] == "Echo"
    # Only what its paths reach: host-only schemas stay in the root document.
    schemas = set(doc["components"]["schemas"])
    assert {"EchoRequest", "EchoJob", "AsyncJobResponse", "Error"} <= schemas
    assert "FileList" not in schemas and "Health" not in schemas


def test_an_unknown_capability_document_is_404(client: TestClient) -> None:
    assert client.get("/v1/text/nope/openapi.json").status_code == 404


# -- plugin fragments ------------------------------------------------------------------------
async def _ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def _fragment_plugin(fragment: Any) -> object:
    class FragmentPlugin:
        @hookimpl
        def register_capabilities(self, register: Callable[[Capability], None]) -> None:
            register(Capability(name="frag", domain="test", title="Fragment test"))

        @hookimpl
        def register_routes(self) -> list[Route]:
            return [Route("/v1/test/frag/run", _ok, methods=["POST"])]

        @hookimpl
        def register_openapi(self) -> Any:
            return fragment

    return FragmentPlugin()


GOOD = {
    "paths": {
        "/v1/test/frag/run": {
            "post": {
                "summary": "Run",
                "requestBody": {
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/FragIn"}}
                    }
                },
                "responses": {
                    "200": {"description": "Done."},
                    "422": {
                        "description": "Invalid.",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                        },
                    },
                },
            }
        }
    },
    "components": {
        "schemas": {"FragIn": {"type": "object", "properties": {"x": {"type": "integer"}}}}
    },
}


def test_a_good_fragment_is_merged(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(), extra_plugins=[("frag", _fragment_plugin(GOOD))])
    with TestClient(app) as c:
        assert c.get("/health").json()["status"] == "ok"
        root = c.get("/openapi.json").json()
        valid_31(root)
        assert "/v1/test/frag/run" in root["paths"] and "FragIn" in root["components"]["schemas"]
        doc = c.get("/v1/test/frag/openapi.json").json()
        valid_31(doc)
        assert doc["x-kiapi-capability"] == "frag" and doc["x-kiapi-domain"] == "test"
        assert set(doc["components"]["schemas"]) == {"FragIn", "Error"}
        assert c.post("/v1/test/frag/run").text == "ok"


def _with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """GOOD with one nested key replaced (or removed when value is ...)."""
    import copy

    doc = copy.deepcopy(GOOD)
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


OP = ("paths", "/v1/test/frag/run", "post")


@pytest.mark.parametrize(
    ("fragment", "says"),
    [
        (["not", "a", "dict"], "openapi fragment invalid at (root)"),
        ({"paths": {"v1/no-slash": {}}}, "'v1/no-slash' does not match '^/'"),
        (_with((*OP, "responses"), ...), "'responses' is a required property"),
        (_with((*OP, "responses"), {}), "should be non-empty"),
        (_with((*OP, "responses"), {"ok": {"description": "x"}}), "'ok' does not match"),
        (_with((*OP, "parameters"), [{"name": "x"}]), "openapi fragment invalid at paths/"),
        (_with((*OP, "tags"), "echo"), "'echo' is not of type 'array'"),
        ({**GOOD, "info": {"title": "mine"}}, "Additional properties are not allowed ('info'"),
        (_with(("components", "schemas", "Frag In"), {}), "'Frag In' does not match"),
        (_with(("components", "widgets"), {}), "'widgets' is not one of"),
        (
            _with(("components", "schemas", "FragIn"), ...),
            "$ref #/components/schemas/FragIn points at no",
        ),
        (
            _with((*OP, "requestBody"), {"$ref": "other.yaml#/Thing"}),
            "unsupported $ref 'other.yaml#/Thing'",
        ),
    ],
    ids=[
        "not-a-dict",
        "path-without-slash",
        "no-responses",
        "empty-responses",
        "bad-status-code",
        "parameter-without-in",
        "tags-not-a-list",
        "top-level-info",
        "bad-component-name",
        "unknown-component-section",
        "dangling-ref",
        "external-ref",
    ],
)
def test_a_bad_fragment_refuses_the_plugin(
    make_settings: Callable[..., Settings], fragment: Any, says: str
) -> None:
    app = create_app(make_settings(), extra_plugins=[("frag", _fragment_plugin(fragment))])
    with TestClient(app) as c:
        health = c.get("/health").json()
        assert health["status"] == "degraded"
        frag = next(p for p in health["plugins"] if p["name"] == "frag")
        assert frag["status"] == "failed"
        assert any(says in e for e in frag["errors"]), frag["errors"]
        # Refused whole: no route, no capability document, and the root document stays valid.
        assert c.post("/v1/test/frag/run").status_code == 404
        assert c.get("/v1/test/frag/openapi.json").status_code == 404
        root = c.get("/openapi.json").json()
        valid_31(root)
        assert not any(p.startswith("/v1/test/") for p in root["paths"])


def test_the_document_declares_bearer_auth_when_a_key_is_set(
    make_settings: Callable[..., Settings],
) -> None:
    key = "k" * 32
    app = create_app(make_settings(api_key=key))
    with TestClient(app, headers={"authorization": f"Bearer {key}"}) as c:
        doc = c.get("/openapi.json").json()
        valid_31(doc)
        assert doc["components"]["securitySchemes"] == {
            "bearer": {"type": "http", "scheme": "bearer"}
        }
        assert doc["security"] == [{"bearer": []}]
        assert doc["paths"]["/health"]["get"]["security"] == []
        assert "401" in doc["paths"]["/v1/text/echo/run"]["post"]["responses"]
        assert "401" not in doc["paths"]["/health"]["get"]["responses"]
        capability = c.get("/v1/text/echo/openapi.json").json()
        valid_31(capability)
        assert capability["security"] == [{"bearer": []}]
        assert "bearer" in capability["components"]["securitySchemes"]


def test_openapi_caches_live_under_the_servers_home(
    make_settings: Callable[..., Settings],
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    create_app(make_settings())
    cached = {p.name for p in (home / "cache").iterdir()}
    assert {"fragment-kiapi.meta.json", "fragment-kiapi.jobs.json"} <= cached
    assert not (tmp_path / "user-cache").exists()
