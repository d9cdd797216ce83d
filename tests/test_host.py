"""The host's HTTP behaviour: /health, JSON errors everywhere, and the request-body limit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import LiveServer, documented, start_server
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from kiapi_core import Capability, hookimpl
from kiapi_core.app import create_app
from kiapi_core.settings import Settings

ECHO = "/v1/text/echo/run"
JSON_HEADERS = {"content-type": "application/json"}


def assert_json_error(response: httpx.Response, status: int) -> Any:
    """The response is ``status`` with a JSON body whose only top-level key we need is detail."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert "detail" in body, body
    return body["detail"]


def assert_field_errors(detail: Any) -> list[dict[str, Any]]:
    """``detail`` is a non-empty list of pydantic-shaped ``{loc, msg, type}`` entries."""
    assert isinstance(detail, list) and detail, detail
    for item in detail:
        assert set(item) == {"loc", "msg", "type"}, item
        assert isinstance(item["loc"], list) and item["loc"], item
        assert isinstance(item["msg"], str) and item["msg"], item
        assert isinstance(item["type"], str) and item["type"], item
    return detail


# -- /health ----------------------------------------------------------------------------------
def test_health_lists_the_host_and_loaded_plugins(client: TestClient) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["version"]
    assert body["queue"] == {"waiting": 0, "running": 0}
    plugins = {p["name"]: p for p in body["plugins"]}
    for name in ("kiapi.meta", "kiapi.jobs", "kiapi.files", "kiapi.images", "kiapi.playground"):
        assert plugins[name]["status"] == "loaded"
    assert plugins["echo"]["status"] == "loaded"
    assert plugins["echo"]["capabilities"] == ["text/echo"]
    assert plugins["echo"]["errors"] == []


# -- 422 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("payload", "field", "error_type"),
    [
        ({"text": ""}, "text", "string_too_short"),
        ({}, "text", "missing"),
        ({"text": "x", "steps": 0}, "steps", "greater_than_equal"),
        ({"text": "x", "steps": "many"}, "steps", "int_parsing"),
        ({"text": "x", "mode": "later"}, "mode", "literal_error"),
        ({"text": "x", "colour": "red"}, "colour", "extra_forbidden"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(
    client: TestClient, payload: dict[str, Any], field: str, error_type: str
) -> None:
    detail = assert_field_errors(assert_json_error(client.post(ECHO, json=payload), 422))
    assert {"loc": ["body", field], "type": error_type} in [
        {"loc": d["loc"], "type": d["type"]} for d in detail
    ], detail


def test_every_invalid_field_is_listed_at_once(client: TestClient) -> None:
    detail = assert_field_errors(
        assert_json_error(client.post(ECHO, json={"text": "", "steps": -1, "delay_s": 99}), 422)
    )
    assert sorted(d["loc"][-1] for d in detail) == ["delay_s", "steps", "text"]


@pytest.mark.parametrize(
    ("body", "error_type", "says"),
    [
        (b'{"text": "hi"', "json_invalid", "malformed JSON"),
        (b"{'text': 'hi'}", "json_invalid", "malformed JSON"),
        (b"", "missing", "empty"),
        (b"   \n", "missing", "empty"),
        (b'["text"]', "model_attributes_type", "expected a JSON object"),
        (b'"text"', "model_attributes_type", "expected a JSON object"),
        (b'{"text": "\xff"}', "json_invalid", "UTF-8"),
        (b"[" * 100 + b"]" * 100, "json_too_deep", "nested deeper"),
    ],
)
def test_malformed_bodies_are_422(
    client: TestClient, body: bytes, error_type: str, says: str
) -> None:
    detail = assert_field_errors(
        assert_json_error(client.post(ECHO, content=body, headers=JSON_HEADERS), 422)
    )
    assert detail[0]["loc"] == ["body"]
    assert detail[0]["type"] == error_type
    assert says in detail[0]["msg"]


def test_a_non_json_content_type_is_415(client: TestClient) -> None:
    response = client.post(ECHO, content=b"text=hi", headers={"content-type": "text/plain"})
    assert "application/json" in assert_json_error(response, 415)


def test_a_valid_request_still_works(client: TestClient) -> None:
    response = client.post(ECHO, json={"text": "hello"})
    assert response.status_code == 200, response.text
    assert response.text == "hello"


# -- 404 / 405 / 409 / 500 -------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/nope", "/v1/text/echo", "/v1/text/echo/run/extra", "/v2"])
def test_unknown_routes_are_json_404(client: TestClient, path: str) -> None:
    detail = assert_json_error(client.get(path), 404)
    assert path in detail and "/openapi.json" in detail


def test_malformed_ids_are_404_not_a_lookup(client: TestClient) -> None:
    for path in ("/v1/jobs/../../etc/passwd", "/v1/jobs/job_XYZ", "/v1/files/file_1"):
        assert_json_error(client.get(path), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", ECHO, {"POST"}),
        ("PUT", ECHO, {"POST"}),
        ("DELETE", "/health", {"GET", "HEAD"}),
        ("POST", "/openapi.json", {"GET", "HEAD"}),
        ("PATCH", "/v1/jobs", {"GET", "HEAD"}),
    ],
)
def test_wrong_method_is_json_405_with_allow(
    client: TestClient, method: str, path: str, allowed: set[str]
) -> None:
    response = client.request(method, path)
    detail = assert_json_error(response, 405)
    assert method in detail and path in detail
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed


def test_canceling_a_finished_job_is_409_with_its_status(client: TestClient) -> None:
    job = client.post(ECHO, json={"text": "a"}, headers={"accept": "application/json"}).json()
    response = client.delete(f"/v1/jobs/{job['id']}")
    assert "already succeeded" in assert_json_error(response, 409)
    assert response.json()["status"] == "succeeded"


async def _crash(request: Request) -> Response:
    raise RuntimeError("secret internals /etc/shadow")


class _Crashing:
    """A plugin whose route raises: the client gets JSON 500, never a traceback."""

    @hookimpl
    def register_capabilities(self, register: Callable[[Capability], None]) -> None:
        register(Capability(name="crash", domain="test"))

    @hookimpl
    def register_routes(self) -> list[Route]:
        return [self.route]

    @hookimpl
    def register_openapi(self) -> dict[str, Any]:
        return documented(self.route)

    route = Route("/v1/test/crash/now", _crash)


def test_an_unhandled_error_is_json_500_without_internals(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings(), extra_plugins=[("crashing", _Crashing())])
    with TestClient(app, raise_server_exceptions=False) as c:
        response = c.get("/v1/test/crash/now")
        detail = assert_json_error(response, 500)
        assert "secret" not in response.text and "Traceback" not in response.text
        assert "log" in detail
        assert c.get("/health").json()["status"] == "ok"


# -- 413: the body limit ---------------------------------------------------------------------
LIMIT = 1000


@pytest.fixture
def small_limit_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(max_body_bytes=LIMIT))) as c:
        yield c


def test_a_declared_length_over_the_limit_is_413(small_limit_client: TestClient) -> None:
    body = json.dumps({"text": "x" * 2 * LIMIT}).encode()
    detail = assert_json_error(
        small_limit_client.post(ECHO, content=body, headers=JSON_HEADERS), 413
    )
    assert "KIAPI_MAX_BODY_BYTES" in detail and str(LIMIT) in detail


def test_a_body_at_the_limit_is_accepted(small_limit_client: TestClient) -> None:
    prefix, suffix = b'{"text": "', b'"}'
    body = prefix + b"x" * (LIMIT - len(prefix) - len(suffix)) + suffix
    assert len(body) == LIMIT
    response = small_limit_client.post(ECHO, content=body, headers=JSON_HEADERS)
    assert response.status_code == 200, response.text


def test_a_streamed_body_over_the_limit_is_413(small_limit_client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(50):
            yield b"x" * 100
        yield b'"}'

    response = small_limit_client.post(ECHO, content=chunks(), headers=JSON_HEADERS)
    assert_json_error(response, 413)


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(
        tmp_path_factory.mktemp("limited"),
        {"KIAPI_MAX_BODY_BYTES": str(LIMIT), "KIAPI_PLUGINS": "echo"},
    )
    try:
        yield server
    finally:
        server.stop()


def _raw_exchange(server: LiveServer, head: bytes, parts: list[bytes]) -> bytes:
    """Send a request head and ``parts`` of body, never finishing the body; read the answer."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        for part in parts:
            sock.sendall(part)
        received = b""
        while b"\r\n\r\n" not in received or not received.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def test_live_a_declared_length_is_refused_before_the_body_is_sent(
    limited_server: LiveServer,
) -> None:
    # The body is never sent: an answer proves the server did not wait to buffer it.
    head = (
        b"POST /v1/text/echo/run HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    answer = _raw_exchange(limited_server, head, [])
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"KIAPI_MAX_BODY_BYTES" in answer


def test_live_a_chunked_body_is_refused_once_it_passes_the_limit(
    limited_server: LiveServer,
) -> None:
    # No Content-Length and no terminating chunk: the server must stop reading at the limit.
    head = (
        b"POST /v1/text/echo/run HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 400
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 3
    answer = _raw_exchange(limited_server, head, parts)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"].startswith(
        "request body is larger than"
    )


def test_live_a_generator_body_is_413_and_small_ones_still_work(
    limited_server: LiveServer,
) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}'

    with limited_server.client() as c:
        try:
            response = c.post(ECHO, content=chunks(), headers=JSON_HEADERS)
        except httpx.WriteError:  # the server may close before the client finishes writing
            pass
        else:
            assert_json_error(response, 413)
        ok = c.post(ECHO, json={"text": "still fine"})
        assert ok.status_code == 200 and ok.text == "still fine"


# -- a small, fast start ---------------------------------------------------------------------
HEAVY = ("mlx", "mflux", "torch", "transformers", "numpy", "PIL")

_START_AND_SERVE = """
import json, sys, threading, time, urllib.request

import uvicorn

from kiapi_core.app import create_app

app = create_app()
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
thread = threading.Thread(target=server.run, daemon=True)
thread.start()
deadline = time.monotonic() + 30
while not server.started:
    assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
    time.sleep(0.01)
port = server.servers[0].sockets[0].getsockname()[1]
with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json") as resp:
    paths = sorted(json.load(resp)["paths"])
with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as resp:
    plugins = {p["name"]: p["status"] for p in json.load(resp)["plugins"]}
server.should_exit = True
thread.join(10)
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))
print(json.dumps({"heavy": heavy, "paths": paths, "plugins": plugins}))
"""


def test_starting_and_serving_openapi_imports_nothing_heavy(tmp_path: Path) -> None:
    # Every installed plugin loads (ideogram4 included): model code must wait for a job.
    result = subprocess.run(
        [sys.executable, "-c", _START_AND_SERVE, *HEAVY],
        env={**os.environ, "KIAPI_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["plugins"]["echo"] == "loaded"
    assert "ideogram4" in report["plugins"], "the ideogram4 plugin is not installed"
    assert all(s == "loaded" for s in report["plugins"].values()), report["plugins"]
    assert "/v1/text/echo/run" in report["paths"]
    assert report["heavy"] == [], f"imported at start-up: {report['heavy']}"
