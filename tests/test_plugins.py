"""Plugin discovery and isolation: entry points, selection, failures, collisions, pip installs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ROOT, LiveServer, install_plugin, run_cli, uninstall_plugin
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from kiapi_core import Capability, ModelSpec, hookimpl
from kiapi_core.app import create_app
from kiapi_core.plugins import PluginError
from kiapi_core.settings import Settings
from kiapi_core.testing import wait_for

ECHO = "/v1/text/echo/run"


async def _ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def _health(app: Any) -> dict[str, Any]:
    with TestClient(app) as c:
        body: dict[str, Any] = c.get("/health").json()
        return body


def _plugin_row(health: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(p for p in health["plugins"] if p["name"] == name)
    return found


def _echo_works(c: TestClient | httpx.Client) -> None:
    response = c.post(ECHO, json={"text": "still here"})
    assert response.status_code == 200, response.text
    assert response.text == "still here"


# -- selection -------------------------------------------------------------------------------
def test_kiapi_plugins_loads_only_the_listed_ones(make_settings: Callable[..., Settings]) -> None:
    health = _health(create_app(make_settings(plugins=["echo"])))
    assert _plugin_row(health, "echo")["status"] == "loaded"
    ideogram = _plugin_row(health, "ideogram4")
    assert ideogram["status"] == "disabled"
    assert "KIAPI_PLUGINS" in ideogram["errors"][0]
    # Disabled is a choice, not a fault.
    assert health["status"] == "ok"


def test_an_empty_plugin_list_loads_no_plugin_but_the_host(
    make_settings: Callable[..., Settings],
) -> None:
    with TestClient(create_app(make_settings(plugins=[]))) as c:
        assert c.get("/health").json()["status"] == "ok"
        assert c.post(ECHO, json={"text": "x"}).status_code == 404
        assert ECHO not in c.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("name", ["echo", "kiapi-echo"])
def test_kiapi_disable_plugins_by_entry_point_or_distribution(
    make_settings: Callable[..., Settings], name: str
) -> None:
    with TestClient(create_app(make_settings(plugins=None, disable_plugins=[name]))) as c:
        echo = _plugin_row(c.get("/health").json(), "echo")
        assert echo["status"] == "disabled"
        assert "KIAPI_DISABLE_PLUGINS" in echo["errors"][0]
        assert c.post(ECHO, json={"text": "x"}).status_code == 404


def test_selection_env_vars_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIAPI_PLUGINS", "echo, ideogram4")
    monkeypatch.setenv("KIAPI_DISABLE_PLUGINS", "ideogram4,")
    monkeypatch.setenv("KIAPI_STRICT_PLUGINS", "1")
    settings = Settings()
    assert settings.plugins == ["echo", "ideogram4"]
    assert settings.disable_plugins == ["ideogram4"]
    assert settings.strict_plugins is True
    monkeypatch.delenv("KIAPI_PLUGINS")
    assert Settings().plugins is None


# -- a hook that raises ----------------------------------------------------------------------
class _RaisingRoutes:
    @hookimpl
    def register_capabilities(self, register: Callable[[Capability], None]) -> None:
        register(Capability(name="half", domain="test"))

    @hookimpl
    def register_routes(self) -> list[Route]:
        raise RuntimeError("routes exploded")


class _WrongType:
    @hookimpl
    def register_models(self, register: Callable[[ModelSpec], None]) -> None:
        register("not a spec")  # type: ignore[arg-type]


class _UnknownHook:
    @hookimpl
    def register_widgets(self) -> None:
        pass


class _UnknownArgument:
    @hookimpl
    def register_routes(self, app: object) -> list[Route]:
        return []


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (_RaisingRoutes(), "register_routes raised RuntimeError: routes exploded"),
        (_WrongType(), "register_models raised TypeError: register() expects a ModelSpec"),
        (_UnknownHook(), "unknown hook(s) register_widgets"),
        (_UnknownArgument(), "hook validation failed"),
    ],
)
def test_a_failing_plugin_is_reported_and_the_rest_keep_working(
    make_settings: Callable[..., Settings], plugin: object, message: str
) -> None:
    app = create_app(make_settings(), extra_plugins=[("faulty", plugin)])
    with TestClient(app) as c:
        health = c.get("/health").json()
        assert health["status"] == "degraded"
        faulty = _plugin_row(health, "faulty")
        assert faulty["status"] == "failed"
        assert any(message in e for e in faulty["errors"]), faulty["errors"]
        assert _plugin_row(health, "echo")["status"] == "loaded"
        _echo_works(c)
        # Accepted together or refused together: nothing of the failed plugin is left.
        assert faulty["capabilities"] == []
        assert c.get("/v1/test/half/openapi.json").status_code == 404


def test_strict_mode_fails_fast(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(PluginError, match=r"'faulty'.*routes exploded"):
        create_app(make_settings(strict_plugins=True), extra_plugins=[("faulty", _RaisingRoutes())])


# -- collisions ------------------------------------------------------------------------------
def _plugin(
    capability: str,
    *routes: Route | Mount,
    components: dict[str, Any] | None = None,
    domain: str = "x",
) -> object:
    """A plugin that follows the rules: a capability, its routes and a fragment documenting
    exactly them (a Mount's inner routes included)."""
    paths: dict[str, Any] = {}
    for route in routes:
        inner = route.routes if isinstance(route, Mount) else [route]
        for r in inner:
            path = (route.path if isinstance(route, Mount) else "") + r.path
            methods = {m.lower() for m in r.methods or {"GET"}} - {"head"}
            paths[path] = {m: {"responses": {"200": {"description": "ok"}}} for m in methods}
    fragment = {"paths": paths, "components": components or {}}

    class RulesPlugin:
        @hookimpl
        def register_capabilities(self, register: Callable[[Capability], None]) -> None:
            register(Capability(name=capability, domain=domain))

        @hookimpl
        def register_routes(self) -> list[Route | Mount]:
            return list(routes)

        @hookimpl
        def register_openapi(self) -> dict[str, Any]:
            return fragment

    return RulesPlugin()


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (
            _plugin("one", Route("/v1/x/one/same", _ok)),
            _plugin("two", Route("/v1/x/one/same", _ok)),
            "route GET /v1/x/one/same overlaps route GET /v1/x/one/same of plugin 'first'",
        ),
        (
            _plugin("one", Mount("/v1/x/one/m", routes=[Route("/a", _ok)])),
            _plugin("two", Route("/v1/x/one/m/b", _ok, methods=["POST"])),
            "route POST /v1/x/one/m/b overlaps route * /v1/x/one/m of plugin 'first'",
        ),
        (
            _plugin("one", components={"schemas": {"Thing": {"type": "string"}}}),
            _plugin("two", components={"schemas": {"Thing": {"type": "integer"}}}),
            "component schemas/Thing is already defined differently by plugin 'first'",
        ),
        (
            _plugin("same"),
            _plugin("same", domain="y"),
            "capability 'same' is already registered by plugin 'first'",
        ),
    ],
    ids=["route", "mount-covers-route", "component", "capability"],
)
def test_the_later_of_two_colliding_plugins_is_refused_naming_both(
    make_settings: Callable[..., Settings], first: object, second: object, message: str
) -> None:
    app = create_app(make_settings(), extra_plugins=[("first", first), ("second", second)])
    health = _health(app)
    assert _plugin_row(health, "first")["status"] == "loaded"
    refused = _plugin_row(health, "second")
    assert refused["status"] == "failed"
    assert any(f"plugin 'second' refused: {message}" in e for e in refused["errors"]), refused
    assert health["status"] == "degraded"


def test_a_plugin_cannot_take_a_host_or_echo_path(make_settings: Callable[..., Settings]) -> None:
    grabby = _plugin("grabby", Route("/health", _ok), Route("/v1/x/grabby/own", _ok))
    app = create_app(make_settings(), extra_plugins=[("grabby", grabby)])
    with TestClient(app) as c:
        errors = " ".join(_plugin_row(c.get("/health").json(), "grabby")["errors"])
        assert "route GET /health overlaps route GET /health of plugin 'kiapi.meta'" in errors
        assert "route GET /health lies outside its capabilities' prefixes" in errors
        # Its other, harmless route was refused with it.
        assert c.get("/v1/x/grabby/own").status_code == 404


def test_identical_components_are_shared_not_a_collision(
    make_settings: Callable[..., Settings],
) -> None:
    shared = {"schemas": {"Shared": {"type": "string", "maxLength": 3}}}
    app = create_app(
        make_settings(),
        extra_plugins=[
            ("one", _plugin("one", components=shared)),
            ("two", _plugin("two", components=shared)),
        ],
    )
    health = _health(app)
    assert health["status"] == "ok", health
    with TestClient(app) as c:
        assert c.get("/openapi.json").json()["components"]["schemas"]["Shared"]["maxLength"] == 3


def test_a_second_plugin_with_a_taken_name_is_reported_not_swapped_in(
    make_settings: Callable[..., Settings],
) -> None:
    impostor = _plugin("impostor", Route("/v1/x/impostor/it", _ok))
    with TestClient(create_app(make_settings(), extra_plugins=[("echo", impostor)])) as c:
        health = c.get("/health").json()
        assert _plugin_row(health, "echo")["status"] == "loaded"
        errors = [e for p in health["plugins"] for e in p["errors"] if "already taken" in e]
        assert errors and "'echo'" in errors[0]
        _echo_works(c)
        assert c.get("/v1/x/impostor/it").status_code == 404


def test_a_disabled_entry_point_does_not_hold_its_name(
    make_settings: Callable[..., Settings],
) -> None:
    # How a plugin author tests the plugin module they also have installed.
    stand_in = _plugin("stand-in", Route("/v1/x/stand-in/it", _ok))
    app = create_app(make_settings(plugins=[]), extra_plugins=[("echo", stand_in)])
    with TestClient(app) as c:
        health = c.get("/health").json()
        assert health["status"] == "ok", health
        assert c.get("/v1/x/stand-in/it").text == "ok"
        assert c.post(ECHO, json={"text": "x"}).status_code == 404


# -- pip: the plugins as real, installed distributions ----------------------------------------
def _cli_plugins(failing: bool = False) -> dict[str, dict[str, Any]]:
    """``kiapi plugins --json``, which exits 1 when a plugin failed (``failing``)."""
    result = run_cli("plugins", "--json")
    assert result.returncode == (1 if failing else 0), result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def test_the_echo_distribution_is_found_through_its_entry_point() -> None:
    echo = _cli_plugins()["echo"]
    assert echo["status"] == "loaded"
    assert echo["distribution"] == "kiapi-echo" and echo["version"] == "0.1.0"
    assert echo["module"] == "kiapi_echo"
    assert echo["capabilities"] == ["text/echo"]
    assert echo["models"] == ["echo/echo-1"]
    assert echo["job_types"] == ["echo"]
    assert set(echo["hooks"]) == {
        "register_capabilities",
        "register_commands",
        "register_models",
        "register_openapi",
        "register_operations",
        "register_routes",
    }


def test_pip_uninstall_and_reinstall_removes_and_restores_the_capability(
    live_server: Callable[..., LiveServer],
) -> None:
    uninstall_plugin("echo")
    try:
        assert "echo" not in _cli_plugins()
        server = live_server({"KIAPI_DISABLE_PLUGINS": "ideogram4"})
        with server.client() as c:
            assert ECHO not in c.get("/openapi.json").json()["paths"]
            assert c.post(ECHO, json={"text": "x"}).status_code == 404
        server.stop()
    finally:
        install_plugin("echo")

    assert _cli_plugins()["echo"]["status"] == "loaded"
    text = run_cli("plugins")
    assert "echo 0.1.0  [loaded]" in text.stdout
    server = live_server({"KIAPI_DISABLE_PLUGINS": "ideogram4"})
    with server.client() as c:
        doc = c.get("/openapi.json").json()
        assert ECHO in doc["paths"] and "EchoRequest" in doc["components"]["schemas"]
        _echo_works(c)


@pytest.fixture(scope="class")
def broken_installed() -> Iterator[None]:
    install_plugin("broken")
    try:
        yield
    finally:
        uninstall_plugin("broken")


@pytest.mark.usefixtures("broken_installed")
class TestBrokenPlugin:
    """tests/plugins/broken raises on import; the host must start anyway and say so."""

    def test_in_process(self, make_settings: Callable[..., Settings]) -> None:
        app = create_app(make_settings(plugins=None, disable_plugins=["ideogram4"]))
        with TestClient(app) as c:
            health = c.get("/health").json()
            assert health["status"] == "degraded"
            broken = _plugin_row(health, "broken")
            assert broken["status"] == "failed"
            assert broken["errors"] == [
                "import failed: RuntimeError: kiapi-broken fails to import on purpose"
            ]
            _echo_works(c)

    def test_cli_reports_it(self) -> None:
        rows = _cli_plugins(failing=True)
        assert rows["broken"]["status"] == "failed"
        assert rows["broken"]["distribution"] == "kiapi-broken"
        assert "fails to import on purpose" in rows["broken"]["errors"][0]
        assert rows["echo"]["status"] == "loaded"
        text = run_cli("plugins")
        assert text.returncode == 1, "a failed plugin fails `kiapi plugins`"
        assert "broken 0.1.0  [failed]" in text.stdout
        assert "error: import failed: RuntimeError" in text.stdout
        # Once: not logged to stderr as well; no traceback unless asked for.
        assert (text.stdout + text.stderr).count("fails to import on purpose") == 1
        assert text.stderr == "kiapi plugins: failed to load: broken\n"
        assert "Traceback" not in text.stdout
        traced = run_cli("plugins", "--traceback")
        assert traced.returncode == 1
        assert "Traceback (most recent call last)" in traced.stdout
        assert 'raise RuntimeError("kiapi-broken fails to import on purpose")' in traced.stdout
        # The other plugins' CLI commands still work.
        echoed = run_cli("echo", "hello from a plugin command")
        assert echoed.returncode == 0 and echoed.stdout == "hello from a plugin command\n"

    def test_live_server_starts_and_reports_it(
        self, live_server: Callable[..., LiveServer]
    ) -> None:
        server = live_server({"KIAPI_DISABLE_PLUGINS": "ideogram4"})
        with server.client() as c:
            health = c.get("/health").json()
            assert health["status"] == "degraded"
            assert _plugin_row(health, "broken")["status"] == "failed"
            _echo_works(c)
        assert "fails to import on purpose" in server.log.read_text()

    def test_strict_mode_refuses_to_start(self) -> None:
        result = run_cli("serve", "--port", "1", env={"KIAPI_STRICT_PLUGINS": "1"})
        assert result.returncode == 1
        assert "'broken'" in result.stderr and "fails to import on purpose" in result.stderr
        assert "Traceback" not in result.stderr


# -- docs/plugins.md: the documented plugin, copied and installed -----------------------------
DOC = ROOT / "docs" / "plugins.md"
_FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def _doc_blocks() -> list[tuple[str, str, str]]:
    """(language, info after the language, body) for every fenced block of docs/plugins.md."""
    return [(m[1], m[2].strip(), m[3]) for m in _FENCE.finditer(DOC.read_text())]


def test_the_documented_plugin_settings_read_their_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydantic import ValidationError

    snippet = next(b for lang, info, b in _doc_blocks() if info == "example=settings")
    namespace: dict[str, Any] = {}
    exec(compile(snippet, str(DOC), "exec"), namespace)
    assert namespace["get_settings"]().volume == 3
    namespace["get_settings"].cache_clear()
    monkeypatch.setenv("KIAPI_SHOUT_VOLUME", "11")
    assert namespace["get_settings"]().volume == 11
    namespace["get_settings"].cache_clear()
    monkeypatch.setenv("KIAPI_SHOUT_VOLUME", "12")
    with pytest.raises(ValidationError, match="volume"):
        namespace["get_settings"]()


def _console_steps() -> list[tuple[str, str]]:
    """(command, expected output) from the ``console`` blocks, in order."""
    steps: list[tuple[str, str]] = []
    for language, _, body in _doc_blocks():
        if language != "console":
            continue
        for line in body.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], ""))
            else:
                command, output = steps[-1]
                steps[-1] = (command, output + line + "\n")
    return steps


def test_the_documented_plugin_is_at_most_50_lines() -> None:
    # Declaring the operation once (kiapi_core.Operation) is what keeps it this short: the
    # route, its OpenAPI and the job handler's registration all come from one declaration.
    plugin = next(body for _, info, body in _doc_blocks() if info.endswith("kiapi_shout.py"))
    assert len(plugin.splitlines()) <= 50


def test_the_documented_plugin_works_when_copied(
    tmp_path: Path, live_server: Callable[..., LiveServer]
) -> None:
    files = {
        info.removeprefix("file="): body
        for _, info, body in _doc_blocks()
        if info.startswith("file=")
    }
    assert set(files) == {"kiapi-shout/pyproject.toml", "kiapi-shout/kiapi_shout.py"}
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    steps = _console_steps()
    assert steps[0][0] == "kiapi install ./kiapi-shout"
    installed_ = run_cli("install", str(tmp_path / "kiapi-shout"), timeout=300)
    assert installed_.returncode == 0, installed_.stderr
    try:
        shout = _cli_plugins()["shout"]
        assert shout["status"] == "loaded", shout["errors"]
        assert shout["distribution"] == "kiapi-shout"
        assert shout["capabilities"] == ["text/shout"]
        assert shout["models"] == ["shout/shout-1"]
        assert shout["hooks"] == ["register_commands", "register_models", "register_operations"]
        assert shout["job_types"] == ["shout"]

        server = live_server({"KIAPI_DISABLE_PLUGINS": "ideogram4"})
        with server.client() as c:
            doc = c.get("/openapi.json").json()
            validate(doc, cls=OpenAPIV31SpecValidator)
            assert "/v1/text/shout/run" in doc["paths"]
            assert {"ShoutRequest", "ShoutJob", "ShoutResult"} <= set(doc["components"]["schemas"])
            capability = c.get("/v1/text/shout/openapi.json").json()
            validate(capability, cls=OpenAPIV31SpecValidator)
            job = c.post(
                "/v1/text/shout/run", json={"text": "hi"}, headers={"accept": "application/json"}
            ).json()
            assert job["status"] == "succeeded" and job["result"]["text"] == "HI!"
            assert c.post("/v1/text/shout/run", json={"text": ""}).status_code == 422
            raw = c.post("/v1/text/shout/run", json={"text": "hi"})
            assert raw.headers["content-type"].startswith("text/plain")
            assert (
                raw.headers["x-kiapi-file-id"]
                == c.get(f"/v1/jobs/{raw.headers['x-kiapi-job-id']}").json()["result"]["file_id"]
            )
            queued = c.post("/v1/text/shout/run", json={"text": "later", "mode": "async"})
            assert queued.status_code == 202
            job_url = f"/v1/jobs/{queued.json()['job_id']}"
            wait_for(lambda: c.get(job_url).json()["status"] == "succeeded")
            done = c.get(job_url).json()
            assert done["result"]["text"] == "LATER!" and done["progress"] == 1.0
            run = doc["paths"]["/v1/text/shout/run"]["post"]
            assert {"200", "202", "413", "415", "422", "429", "503", "504"} <= set(run["responses"])

        # The documented commands, run as written (against this server's port).
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        checked = 0
        for command, expected in steps:
            if not command.startswith(("curl ", "kiapi shout")):
                continue
            command = command.replace("http://127.0.0.1:8000", server.url)
            result = subprocess.run(
                command, shell=True, env=env, capture_output=True, text=True, timeout=30
            )
            assert result.returncode == 0, (command, result.stderr)
            assert result.stdout.strip() == expected.strip(), command
            checked += 1
        assert checked == 3

        # The in-process test from "Testing a plugin", run as a test.
        snippet = next(body for lang, info, body in _doc_blocks() if lang == "python" and not info)
        namespace: dict[str, Any] = {}
        exec(compile(snippet, str(DOC), "exec"), namespace)
        namespace["test_shout"](tmp_path / "snippet-home")
    finally:
        removed = run_cli("uninstall", "kiapi-shout")
        assert removed.returncode == 0, removed.stderr
    assert "shout" not in _cli_plugins()
