"""Bearer auth: with KIAPI_API_KEY set, every route but /health needs the key."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import LiveServer, run_cli
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from kiapi_core import Capability, hookimpl
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
        path = path.replace("{family}", "echo").replace("{name}", "echo-1")
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


# -- every documented route on a live server -------------------------------------------------
GOOD = {"authorization": f"Bearer {KEY}"}
WRONG_KEYS = [
    {},
    {"authorization": "Bearer not-the-key-5f3a9c"},
    {"authorization": f"Bearer {KEY}x"},
    {"authorization": f"Basic {KEY}"},
]
HTTP_METHODS = ("get", "post", "put", "patch", "delete")


def _request_body(operation: dict[str, Any]) -> dict[str, Any]:
    """Something for the route's body: a file for uploads, an empty object for JSON (which
    validation refuses: the point is that auth let it through, not what it does)."""
    content = operation.get("requestBody", {}).get("content", {})
    if "multipart/form-data" in content:
        return {"files": {"file": ("auth.txt", b"authorized upload")}}
    if "application/json" in content:
        return {"json": {}}
    return {}


def test_every_documented_route_on_a_live_server(
    live_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    server = live_server(
        {"KIAPI_API_KEY": KEY, "KIAPI_PLUGINS": "echo,ideogram4", "KIAPI_ACCESS_LOG": "1"}
    )
    with server.client() as c:
        for headers in WRONG_KEYS:
            _assert_401(c.get("/openapi.json", headers=headers))
        doc = c.get("/openapi.json", headers=GOOD).json()
        assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        # Real ids, so the authorized calls reach real content: a finished job (its events
        # stream and its artifact), and files to read and to delete.
        done = c.post(ECHO, json={"text": "x"}, headers={**GOOD, "accept": "application/json"})
        job_id = done.json()["id"]
        readable = done.json()["artifacts"][0]
        deletable = c.post("/v1/files", files={"file": ("d.txt", b"d")}, headers=GOOD).json()["id"]

        operations = [
            (method.upper(), path, item[method])
            for path, item in doc["paths"].items()
            for method in HTTP_METHODS
            if method in item
        ]
        if c.get("/docs", headers=GOOD).status_code != 404:
            operations.append(("GET", "/docs", {}))
        templates = {path for _, path, _ in operations}
        assert {"/v1/jobs/{job_id}/events", "/v1/files/{file_id}/download", ECHO} <= templates
        assert "/v1/image/ideogram4/generate" in templates

        checked = []
        for method, template, operation in operations:
            file_id = deletable if method == "DELETE" else readable
            path = template.replace("{job_id}", job_id).replace("{file_id}", file_id)
            path = path.replace("{family}", "echo").replace("{name}", "echo-1")
            assert "{" not in path, path
            body = _request_body(operation)
            if template == "/health":
                for headers in WRONG_KEYS:
                    assert c.get(path, headers=headers).status_code == 200
                assert "security" in operation and operation["security"] == []
                continue
            for headers in WRONG_KEYS:
                _assert_401(c.request(method, path, headers=headers, **body))
            if template != "/docs":
                assert "401" in operation["responses"], f"401 undocumented on {method} {template}"
            if template == "/v1/events":  # a live stream of every job: never ends by itself
                with c.stream(method, path, headers=GOOD) as live:
                    assert live.status_code == 200
                    assert live.headers["content-type"].startswith("text/event-stream")
                checked.append(f"{method} {template}")
                continue
            ok = c.request(method, path, headers=GOOD, **body)
            assert ok.status_code not in (401, 403) and ok.status_code < 500, (
                method,
                template,
                ok.status_code,
                ok.text[:300],
            )
            if template == "/v1/jobs/{job_id}/preview":  # a finished job's preview is gone
                assert ok.status_code == 404 and "previews are dropped" in ok.json()["detail"]
            elif method == "GET":
                assert 200 <= ok.status_code < 300, (template, ok.status_code, ok.text[:300])
            checked.append(f"{method} {template}")
        assert len(checked) == len(operations) - 1, checked  # all but /health
        # The two streamed routes answered with their content.
        events = c.get(f"/v1/jobs/{job_id}/events", headers=GOOD)
        assert "event: end" in events.text
        assert c.get(f"/v1/files/{readable}/download", headers=GOOD).content == b"x"
    log = server.output()
    assert "GET /v1/jobs" in log  # the access log was on: the requests are there...
    assert KEY not in log  # ...and the key, right or almost right, is not
    assert "not-the-key-5f3a9c" not in log


def test_the_key_never_shows_in_kiapi_config(tmp_path: Path) -> None:
    env = {"KIAPI_API_KEY": KEY, "KIAPI_HOME": str(tmp_path / "home")}
    for args in (("config",), ("config", "--json")):
        shown = run_cli(*args, env=env)
        assert shown.returncode == 0, shown.stderr
        assert KEY not in shown.stdout + shown.stderr
    assert "KIAPI_API_KEY=***" in run_cli("config", env=env).stdout
    assert json.loads(run_cli("config", "--json", env=env).stdout)["api_key"] == "***"


@pytest.mark.parametrize("key", [KEY + " ", "\t" + KEY, KEY + "\n", " " + KEY + " "])
def test_a_key_with_surrounding_whitespace_is_refused(key: str, tmp_path: Path) -> None:
    # Clients' tokens are stripped, so such a key would lock everyone out: refuse it at start.
    with pytest.raises(ValueError, match="leading or trailing whitespace") as caught:
        Settings(home=tmp_path, api_key=key)
    assert KEY not in str(caught.value)
    result = run_cli("serve", env={"KIAPI_HOME": str(tmp_path), "KIAPI_API_KEY": key})
    assert result.returncode == 1
    assert "KIAPI_API_KEY: Value error, has leading or trailing whitespace" in result.stderr
    assert KEY not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "KIAPI_FILES_DIR" not in result.stderr


def test_a_key_with_control_characters_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="control characters"):
        Settings(home=tmp_path, api_key="abc\x01def")


# -- CORS --------------------------------------------------------------------------------------
APP = "http://app.example"
EVIL = "http://evil.example"


def _preflight(c: httpx.Client, origin: str) -> httpx.Response:
    return c.options(
        ECHO,
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )


def test_cors_is_off_unless_configured(live_server: Callable[..., LiveServer]) -> None:
    server = live_server({"KIAPI_PLUGINS": "echo"})
    with server.client() as c:
        r = c.post(ECHO, json={"text": "hi"}, headers={"origin": APP})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        pre = _preflight(c, APP)
        assert "access-control-allow-origin" not in pre.headers
        assert (
            "access-control-allow-origin" not in c.get("/v1/jobs", headers={"origin": EVIL}).headers
        )


def test_configured_origins_work(live_server: Callable[..., LiveServer]) -> None:
    server = live_server(
        {
            "KIAPI_PLUGINS": "echo",
            "KIAPI_API_KEY": KEY,
            "KIAPI_CORS_ORIGINS": f"{APP}, http://b.example",
        }
    )
    with server.client() as c:
        # A browser's preflight from an allowed origin is answered without the key (browsers
        # never send credentials on a preflight) and allows the Authorization header.
        pre = _preflight(c, APP)
        assert pre.status_code == 200, pre.text
        assert pre.headers["access-control-allow-origin"] == APP
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        assert "POST" in pre.headers["access-control-allow-methods"]
        # The real request still needs the key; both answers are readable by the page.
        denied = c.post(ECHO, json={"text": "hi"}, headers={"origin": APP})
        _assert_401(denied)
        assert denied.headers["access-control-allow-origin"] == APP
        ok = c.post(ECHO, json={"text": "hi"}, headers={**GOOD, "origin": APP})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == APP
        assert "x-kiapi-job-id" in ok.headers["access-control-expose-headers"].lower()
        assert (
            c.get("/v1/jobs", headers={**GOOD, "origin": "http://b.example"}).headers[
                "access-control-allow-origin"
            ]
            == "http://b.example"
        )
        # Any other origin gets no CORS headers at all, key or not.
        evil = _preflight(c, EVIL)
        assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
        sneaky = c.get("/v1/jobs", headers={**GOOD, "origin": EVIL})
        assert sneaky.status_code == 200 and "access-control-allow-origin" not in sneaky.headers


def test_other_origins_get_no_cors_headers_at_all(live_server: Callable[..., LiveServer]) -> None:
    server = live_server({"KIAPI_PLUGINS": "echo", "KIAPI_API_KEY": KEY, "KIAPI_CORS_ORIGINS": APP})

    def cors_headers(r: httpx.Response) -> list[str]:
        return [name for name in r.headers if name.lower().startswith("access-control-")]

    with server.client() as c:
        answers = {
            "preflight": _preflight(c, EVIL),
            "preflight-no-headers": c.options(
                ECHO, headers={"origin": EVIL, "access-control-request-method": "GET"}
            ),
            "simple": c.get("/v1/jobs", headers={**GOOD, "origin": EVIL}),
            "no-key": c.post(ECHO, json={"text": "hi"}, headers={"origin": EVIL}),
            "not-found": c.get("/nowhere", headers={**GOOD, "origin": EVIL}),
            "health": c.get("/health", headers={"origin": "null"}),
            "post": c.post(ECHO, json={"text": "hi"}, headers={**GOOD, "origin": EVIL}),
        }
        for name, r in answers.items():
            assert cors_headers(r) == [], (name, dict(r.headers))
            # The answer depends on the origin: caches must keep them apart.
            assert "origin" in r.headers.get("vary", "").lower(), name
        assert answers["simple"].status_code == 200 and answers["post"].status_code == 200
        assert answers["no-key"].status_code == 401
        refused = answers["preflight"]
        assert refused.status_code == 400
        assert "not in KIAPI_CORS_ORIGINS" in refused.json()["detail"]
        # The listed origin still gets its headers.
        ok = c.get("/v1/jobs", headers={**GOOD, "origin": APP})
        assert ok.headers["access-control-allow-origin"] == APP
        assert "x-kiapi-job-id" in ok.headers["access-control-expose-headers"].lower()
        assert _preflight(c, APP).headers["access-control-allow-origin"] == APP


# -- WebSockets --------------------------------------------------------------------------------
class _SocketPlugin:
    """A plugin with a WebSocket route: auth covers it like any other route."""

    @hookimpl
    def register_capabilities(self, register: Callable[[Capability], None]) -> None:
        register(Capability(name="socket", domain="text"))

    @hookimpl
    def register_routes(self) -> list[BaseRoute]:
        async def talk(ws: WebSocket) -> None:
            await ws.accept()
            await ws.send_text("secret stream")
            await ws.close()

        return [WebSocketRoute("/v1/text/socket/stream", talk)]


def test_websocket_routes_need_the_key(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(api_key=KEY), extra_plugins=[("socket", _SocketPlugin())])
    with TestClient(app) as c:
        for headers in WRONG_KEYS:
            with (
                pytest.raises(WebSocketDisconnect) as refused,
                c.websocket_connect("/v1/text/socket/stream", headers=headers) as ws,
            ):
                ws.receive_text()
            assert refused.value.code == 1008
        with c.websocket_connect("/v1/text/socket/stream", headers=GOOD) as ws:
            assert ws.receive_text() == "secret stream"
