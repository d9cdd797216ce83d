"""What a plugin may not do, what its handlers may decide, and what it may check, each proven
with tests/plugins/rules (kiapi-rules) installed for real.

``RULES_PLUGIN_MODE`` names the rule the plugin breaks; unset, it breaks none. Its hooks read
the variable at each call, so one installed copy serves every test here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import install_plugin, installed, run_cli, uninstall_plugin
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from starlette.testclient import TestClient

from kiapi_core.app import create_app
from kiapi_core.jobs.store import SqliteJobStore
from kiapi_core.plugins import PluginError
from kiapi_core.settings import Settings
from kiapi_core.state.sqlite import Database
from kiapi_core.testing import wait_for
from kiapi_core.web.route_paths import overlap, parse

MODE = "RULES_PLUGIN_MODE"
RUN = "/v1/test/rules/run"
ECHO = "/v1/text/echo/run"
JSON = {"accept": "application/json"}


@pytest.fixture(scope="module", autouse=True)
def rules_installed() -> Iterator[None]:
    was_installed = installed("kiapi-rules")
    install_plugin("rules")
    yield
    if not was_installed:
        uninstall_plugin("rules")


@pytest.fixture
def rules_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return make_settings(**{"plugins": ["echo", "rules"], **overrides})

    return make


def _row(health: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(p for p in health["plugins"] if p["name"] == name)
    return found


# -- templates compared by structure --------------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b", "both"),
    [
        ("/v1/image/{cap}/generate", "/v1/image/ideogram4/generate", True),
        ("/v1/image/ideogram4/generate", "/v1/image/{cap}/generate", True),
        ("/v1/{rest:path}", "/v1/jobs/{job_id}/events", True),
        ("/v1/x/{n:int}", "/v1/x/12", True),
        ("/v1/x/{n:int}", "/v1/x/abc", False),
        ("/v1/x/card-{id}", "/v1/x/card-7", True),
        ("/v1/x/card-{id}", "/v1/x/deck-7", False),
        ("/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", False),
        ("/v1/a", "/v1/b", False),
    ],
)
def test_two_templates_overlap_when_one_request_path_matches_both(
    a: str, b: str, both: bool
) -> None:
    assert overlap(parse(a), parse(b)) is both


def test_a_prefix_covers_itself_and_everything_below() -> None:
    prefix = parse("/v1/text/echo", below=True)
    assert overlap(prefix, parse("/v1/text/echo"))
    assert overlap(prefix, parse("/v1/text/echo/openapi.json"))
    assert not overlap(prefix, parse("/v1/text/echoes/run"))


# -- 1. ownership, enforced at load ---------------------------------------------------------
RULES = [
    (
        "steal-param",
        "route POST /v1/text/{cap}/run overlaps route POST /v1/text/echo/run of plugin 'echo'",
    ),
    (
        "steal-path",
        "route GET /v1/{rest:path} overlaps route GET /v1/models of plugin 'kiapi.meta'",
    ),
    (
        "inside-other",
        "route POST /v1/text/echo/extra overlaps the prefix /v1/text/echo/ of capability 'echo'"
        " of plugin 'echo'",
    ),
    ("inside-other", "route POST /v1/text/echo/extra lies outside its capabilities' prefixes"),
    (
        "inside-host",
        "route GET /v1/jobs/{job_id}/textcard overlaps the paths under /v1/jobs/ of plugin"
        " 'kiapi.jobs'",
    ),
    (
        "shadow-document",
        "route GET /v1/test/rules/{page} overlaps route GET /v1/test/rules/openapi.json",
    ),
    (
        "doc-extra",
        "its OpenAPI fragment documents /v1/text/echo/secret, which none of its routes serves",
    ),
    ("undocumented", "route GET /v1/test/rules/hidden has no path item in its OpenAPI fragment"),
    (
        "doc-method",
        "its OpenAPI fragment documents GET /v1/test/rules/run, which its routes do not serve",
    ),
    (
        "bad-doc",
        "the merged OpenAPI document would be invalid at paths//v1/test/rules/run/description:"
        " 42 is not of type",
    ),
    ("bad-doc", "'boolian' is not valid under any of the given schemas"),
    (
        "alias-clash",
        "model name, alias or family 'echo' (its model cards/card) already selects model"
        " echo/echo-1 of plugin 'echo'",
    ),
    ("bad-name", "model name 'Text Card!' must match ^[a-z0-9][a-z0-9._-]{0,63}$"),
    ("commands-raise", "register_commands raised RuntimeError: commands exploded"),
    ("command-clash", "command 'echo' is already registered by plugin 'echo'"),
]


@pytest.mark.parametrize(
    ("mode", "message"), RULES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(RULES)]
)
def test_each_broken_rule_refuses_the_whole_plugin_and_spares_the_others(
    monkeypatch: pytest.MonkeyPatch,
    rules_settings: Callable[..., Settings],
    mode: str,
    message: str,
) -> None:
    monkeypatch.setenv(MODE, mode)
    with TestClient(create_app(rules_settings())) as c:
        health = c.get("/health").json()
        assert health["status"] == "degraded"
        rules = _row(health, "rules")
        assert rules["status"] == "failed"
        assert any(message in e for e in rules["errors"]), rules["errors"]
        # All or nothing: no route, document, model or command of it is left.
        assert rules["capabilities"] == []
        assert c.post(RUN, json={}).status_code == 404
        assert c.get("/v1/test/rules/openapi.json").status_code == 404
        assert not any(
            m["family"] in ("rules", "cards") for m in c.get("/v1/models").json()["data"]
        )
        doc = c.get("/openapi.json").json()
        validate(doc, cls=OpenAPIV31SpecValidator)
        assert not any("rules" in path or "secret" in path for path in doc["paths"])
        # The others are unaffected: echo answers its own paths, its document is its own.
        assert _row(health, "echo")["status"] == "loaded"
        echoed = c.post(ECHO, json={"text": "still echo", "model": "echo"})
        assert echoed.status_code == 200 and echoed.text == "still echo"
        assert set(c.get("/v1/text/echo/openapi.json").json()["paths"]) == {
            "/v1/text/echo/run",
            "/v1/text/echo/models",
            "/v1/text/echo/openapi.json",
        }


def test_the_plugin_loads_when_it_breaks_no_rule(
    monkeypatch: pytest.MonkeyPatch, rules_settings: Callable[..., Settings]
) -> None:
    monkeypatch.delenv(MODE, raising=False)
    with TestClient(create_app(rules_settings())) as c:
        health = c.get("/health").json()
        assert _row(health, "rules")["status"] == "loaded", _row(health, "rules")["errors"]
        assert c.post(RUN, json={}).text == "rules ok"
        validate(c.get("/v1/test/rules/openapi.json").json(), cls=OpenAPIV31SpecValidator)


def test_strict_mode_makes_a_broken_rule_fatal(
    monkeypatch: pytest.MonkeyPatch, rules_settings: Callable[..., Settings]
) -> None:
    monkeypatch.setenv(MODE, "steal-param")
    with pytest.raises(PluginError, match=r"'rules'.*overlaps route POST /v1/text/echo/run"):
        create_app(rules_settings(strict_plugins=True))


def test_a_refused_plugin_has_no_cli_commands() -> None:
    assert run_cli("rules-hello").stdout == "hello from rules\n"
    refused = run_cli("rules-hello", env={MODE: "steal-param"})
    assert refused.returncode == 2 and "No such command 'rules-hello'" in refused.stderr
    raising = run_cli("plugins", "--json", env={MODE: "commands-raise"})
    assert raising.returncode == 1
    rules = next(r for r in json.loads(raising.stdout) if r["name"] == "rules")
    assert rules["status"] == "failed"
    assert rules["errors"] == ["register_commands raised RuntimeError: commands exploded"]


def test_the_host_command_names_are_the_clis() -> None:
    import click

    from kiapi_core.cli import cli
    from kiapi_core.plugins import HOST_COMMANDS

    ctx = click.Context(cli)
    assert set(cli.list_commands(ctx)) == HOST_COMMANDS
    for name in HOST_COMMANDS:
        command = cli.get_command(ctx, name)  # its module imported only now
        assert command is not None and command.name == name


# -- 2. a handler fails its job with a status of its choice ----------------------------------
def test_a_handler_can_fail_its_job_with_a_client_error(
    rules_settings: Callable[..., Settings],
) -> None:
    settings = rules_settings()
    with TestClient(create_app(settings)) as c:
        refused = c.post(RUN, json={"fail_status": 404, "detail": "no card named 'x'"})
        assert refused.status_code == 404, refused.text
        assert refused.json()["detail"] == "no card named 'x'"
        job = c.get(f"/v1/jobs/{refused.json()['job_id']}").json()
        assert job["status"] == "failed" and job["error"] == "no card named 'x'"
        structured = c.post(RUN, json={"fail_status": 422, "detail": {"loc": ["card"]}})
        assert structured.status_code == 422 and structured.json()["detail"] == {"loc": ["card"]}
        # What routes raise works in a handler too.
        conflict = c.post(RUN, json={"api_error": 409})
        assert conflict.status_code == 409 and conflict.json()["detail"] == "no such card"
    # The status is stored with the job, not only in this answer.
    stored = SqliteJobStore(Database(settings.db_path)).get(refused.json()["job_id"])
    assert stored is not None and stored.error_status == 404 and stored.error_kind == "http_error"


def test_any_other_failure_is_a_500_that_names_no_path(
    rules_settings: Callable[..., Settings], home: Path
) -> None:
    with TestClient(create_app(rules_settings())) as c:
        crashed = c.post(RUN, json={"crash": True})
        assert crashed.status_code == 500
        detail = crashed.json()["detail"]
        assert detail.startswith("FileNotFoundError: [Errno 2] No such file or directory: '<path>'")
        job = c.get(f"/v1/jobs/{crashed.json()['job_id']}").json()
        for text in (detail, job["error"]):
            assert str(home) not in text and "no-such-dir" not in text


# -- 3. the raw answer depends on the request only ------------------------------------------
def test_a_raw_answer_never_turns_into_job_json(rules_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(rules_settings())) as c:
        assert c.post(RUN, json={}).text == "rules ok"
        assert c.post(RUN, json={}, headers=JSON).json()["status"] == "succeeded"
        for headers in ({}, JSON):
            two = c.post(RUN, json={"save": 2}, headers=headers)
            assert two.status_code == 500, two.text
            assert "saved 2 files, but this job must save exactly one (text/plain)" in two.text
        queued = c.post(RUN, json={"save": 0, "mode": "async"}).json()
        job = wait_for(
            lambda: (j := c.get(f"/v1/jobs/{queued['job_id']}").json())["finished_at"] and j
        )
        assert job["status"] == "failed" and "saved 0 files" in job["error"]
        assert job["artifacts"] == []


def test_an_image_job_must_save_exactly_one_image(rules_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(rules_settings())) as c:
        ok = c.post("/v1/images/generations", json={"model": "rules-1", "prompt": "a card"})
        assert ok.status_code == 200, ok.text
        assert base64.b64decode(ok.json()["data"][0]["b64_json"]).startswith(b"\x89PNG")
        two = c.post(
            "/v1/images/generations", json={"model": "rules-1", "prompt": "a card", "save": 2}
        )
        assert two.status_code == 500, two.text
        assert (
            "saved 2 files, but this job must save exactly one (image/png)"
            in (two.json()["error"]["message"])
        )


# -- 4. a job no loaded plugin handles -------------------------------------------------------
def test_a_job_no_plugin_handles_is_refused_at_submit(
    rules_settings: Callable[..., Settings],
) -> None:
    with TestClient(create_app(rules_settings())) as c:
        refused = c.post("/v1/test/rules/orphan", json={})
        assert refused.status_code == 503
        assert "no loaded plugin handles job type 'rules-gone'" in refused.json()["detail"]
        assert c.get("/v1/jobs").json()["jobs"] == []


def test_queued_jobs_of_a_plugin_no_longer_loaded_fail_at_start(
    rules_settings: Callable[..., Settings],
) -> None:
    with TestClient(create_app(rules_settings(workers=1))) as c:
        running = c.post(RUN, json={"sleep": 30, "mode": "async"}).json()
        wait_for(lambda: c.get(f"/v1/jobs/{running['job_id']}").json()["status"] == "running")
        waiting = c.post(RUN, json={"mode": "async"}).json()
        assert c.get("/health").json()["queue"]["waiting"] == 1
    # Restarted with the plugin gone (uninstalled, disabled, or failing to load).
    with TestClient(create_app(rules_settings(plugins=["echo"]))) as c:
        job = c.get(f"/v1/jobs/{waiting['job_id']}").json()
        assert job["status"] == "failed"
        assert "no loaded plugin handles job type 'rules'" in job["error"]
        assert "not loaded" in job["error"]
        assert c.get("/health").json()["queue"]["waiting"] == 0


# -- 5. health checks -----------------------------------------------------------------------
def test_a_failing_health_check_degrades_health_and_is_reported(
    monkeypatch: pytest.MonkeyPatch, rules_settings: Callable[..., Settings]
) -> None:
    monkeypatch.setenv(MODE, "check-fails")
    with TestClient(create_app(rules_settings())) as c:

        def checked() -> dict[str, Any] | None:
            health: dict[str, Any] = c.get("/health").json()
            return health if _row(health, "rules")["checks"][0]["status"] != "pending" else None

        health = wait_for(checked)
        check = _row(health, "rules")["checks"][0]
        assert check["name"] == "native" and check["status"] == "failed"
        assert check["detail"] == "ModuleNotFoundError: No module named 'kiapi_rules_native'"
        assert health["status"] == "degraded"
        assert _row(health, "rules")["status"] == "loaded"
        assert c.post(ECHO, json={"text": "fine"}).text == "fine"


def test_a_passing_health_check_keeps_health_ok(
    monkeypatch: pytest.MonkeyPatch, rules_settings: Callable[..., Settings]
) -> None:
    monkeypatch.delenv(MODE, raising=False)
    with TestClient(create_app(rules_settings())) as c:
        health = wait_for(
            lambda: _row(h := c.get("/health").json(), "rules")["checks"][0]["status"] == "ok" and h
        )
        assert _row(health, "rules")["checks"][0]["detail"] == "rules native ok"
        assert health["status"] == "ok"


def test_the_cli_reports_a_failing_check_and_activate_explains_it(tmp_path: Path) -> None:
    env = {MODE: "check-fails", "KIAPI_PLUGINS": "echo,rules"}
    listed = run_cli("plugins", env=env)
    assert listed.returncode == 1
    assert "rules 0.1.0  [loaded, check failed]" in listed.stdout
    assert (
        "check native: failed (ModuleNotFoundError: No module named 'kiapi_rules_native')"
        in listed.stdout
    )
    assert "failing health checks: rules" in listed.stderr
    status = json.loads(run_cli("status", "--json", env=env).stdout)
    assert status["checks"]["rules"][0]["status"] == "failed"
    activated = run_cli("activate", "rules-heavy", env=env)
    assert activated.returncode == 1
    assert "plugin 'rules' cannot run on this machine: its health check 'native' failed" in (
        activated.stderr
    )
    assert "Traceback" not in activated.stderr
    # The check passing, the plugin's own weights check still fails on the import: said plainly.
    folder = tmp_path / "weights"
    folder.mkdir()
    env.pop(MODE)
    checked = run_cli("activate", "rules-heavy", "--path", str(folder), env=env)
    assert checked.returncode == 1
    assert "could not check" in checked.stderr and "kiapi_rules_native" in checked.stderr
    assert "Traceback" not in checked.stderr


def test_ideogram4s_mlx_check_passes_here() -> None:
    result = run_cli("plugins", "--json", env={"KIAPI_PLUGINS": "ideogram4"})
    assert result.returncode == 0, result.stderr
    ideogram = next(r for r in json.loads(result.stdout) if r["name"] == "ideogram4")
    (check,) = ideogram["checks"]
    assert check["name"] == "mlx" and check["status"] == "ok", check
    assert "Device(cpu" in check["detail"]


def test_ideogram4_reports_an_mlx_that_cannot_import(tmp_path: Path) -> None:
    # What a CUDA wheel without libcuda looks like: `import mlx.core` raises.
    fake = tmp_path / "fake" / "mlx"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core.py").write_text(
        'raise ImportError("libcuda.so.1: cannot open shared object file: No such file")\n'
    )
    env = {"PYTHONPATH": str(fake.parent), "KIAPI_PLUGINS": "ideogram4"}
    listed = run_cli("plugins", env=env)
    assert listed.returncode == 1
    assert "ideogram4 0.1.0  [loaded, check failed]" in listed.stdout
    assert "check mlx: failed (ImportError: libcuda.so.1: cannot open shared object" in (
        listed.stdout
    )
    folder = tmp_path / "weights"
    folder.mkdir()
    activated = run_cli("activate", "ideogram4", "--path", str(folder), env=env)
    assert activated.returncode == 1
    assert "plugin 'ideogram4' cannot run on this machine: its health check 'mlx' failed" in (
        activated.stderr
    )
    assert "libcuda.so.1" in activated.stderr and "Traceback" not in activated.stderr
