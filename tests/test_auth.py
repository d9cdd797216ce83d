"""Bearer auth: with KIAPI_API_KEY set, every route but /health needs the key."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import httpx
import pytest
from helpers import LiveServer
from starlette.routing import Route
from starlette.testclient import TestClient

from kiapi_core.app import create_app
from kiapi_core.settings import Settings

KEY = "kiapi-test-key-0123456789"
ECHO = "/v1/text/echo/run"


@pytest.fixture
def locked(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(api_key=KEY))) as c:
        yield c


def _every_route(client: TestClient) -> list[tuple[str, str]]:
    """(method, concrete path) for every route the app serves, ids filled with valid shapes."""
    out: list[tuple[str, str]] = []
    for route in client.app.routes:  # type: ignore[attr-defined]
        assert isinstance(route, Route)
        path = re.sub(r"\{job_id\}", "job_0123456789abcdef", route.path)
        path = re.sub(r"\{file_id\}", "file_0123456789abcdef", path)
        assert "{" not in path, path
        out.extend((method, path) for method in sorted(route.methods or ()) if method != "HEAD")
    return out


def _assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, (response.request.url, response.text)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in response.json()["detail"]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong-key",
        f"Bearer {KEY}x",
        f"Bearer {KEY[:-1]}",
        f"Basic {KEY}",
        KEY,
        f"Token {KEY}",
    ],
)
def test_every_route_but_health_needs_the_key(
    locked: TestClient, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    routes = _every_route(locked)
    assert ("POST", ECHO) in routes and ("GET", "/openapi.json") in routes
    for method, path in routes:
        if path == "/health":
            continue
        _assert_401(locked.request(method, path, headers=headers))
    # Unknown paths too: a 404 would tell a stranger which paths exist.
    _assert_401(locked.get("/no/such/path", headers=headers))


def test_health_is_open(locked: TestClient) -> None:
    response = locked.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_right_key_works(locked: TestClient, scheme: str) -> None:
    headers = {"authorization": f"{scheme} {KEY}"}
    assert locked.get("/openapi.json", headers=headers).status_code == 200
    assert locked.get("/v1/jobs", headers=headers).status_code == 200
    response = locked.post(ECHO, json={"text": "authorized"}, headers=headers)
    assert response.status_code == 200 and response.text == "authorized"
    # Past auth, the usual answers come back.
    assert locked.get("/nope", headers=headers).status_code == 404
    assert locked.get("/v1/jobs/job_0123456789abcdef", headers=headers).status_code == 404


def test_no_key_means_no_auth(client: TestClient) -> None:
    assert client.get("/openapi.json").status_code == 200
    assert client.post(ECHO, json={"text": "open"}).text == "open"


def test_auth_on_a_live_server(live_server: Callable[..., LiveServer]) -> None:
    server = live_server({"KIAPI_API_KEY": KEY, "KIAPI_PLUGINS": "echo"})
    with server.client() as c:
        assert c.get("/health").status_code == 200
        _assert_401(c.get("/openapi.json"))
        _assert_401(c.post(ECHO, json={"text": "x"}, headers={"authorization": "Bearer nope"}))
        ok = c.post(ECHO, json={"text": "live"}, headers={"authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.text == "live"
    assert KEY not in server.log.read_text()
