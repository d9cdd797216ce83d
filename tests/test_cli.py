"""The `kiapi` command: serve, plugins, config (secrets masked), the TOML config file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import ROOT, free_port, run_cli

from kiapi_core.settings import ConfigFileError, Settings

SECRET = "s3cret-api-key-never-printed"


def test_plugins_lists_name_version_hooks_capabilities() -> None:
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in ("meta", "jobs", "files", "images", "playground"):
        assert f"kiapi.{name} 0.1.0  [loaded]  (built in)" in out
    assert "echo 0.1.0  [loaded]" in out
    assert "capabilities: text/echo" in out
    assert "models: echo/echo-1" in out
    assert "hooks: register_capabilities, register_commands" in out


def test_plugins_json_is_machine_readable() -> None:
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    builtin = [r["name"] for r in rows if r["builtin"]]
    assert builtin == [
        "kiapi.meta",
        "kiapi.jobs",
        "kiapi.files",
        "kiapi.images",
        "kiapi.playground",
    ]
    keys = {
        "name",
        "module",
        "version",
        "distribution",
        "builtin",
        "status",
        "hooks",
        "capabilities",
        "models",
        "job_types",
        "paths",
        "commands",
        "errors",
        "checks",
    }
    assert all(set(r) == keys for r in rows)
    host = rows[0]
    assert host["builtin"] is True and "/health" in host["paths"]


def test_plugins_honours_the_selection_settings() -> None:
    rows = json.loads(run_cli("plugins", "--json", env={"KIAPI_DISABLE_PLUGINS": "echo"}).stdout)
    echo = next(r for r in rows if r["name"] == "echo")
    assert echo["status"] == "disabled" and echo["hooks"] == []


def test_a_plugin_can_add_a_command() -> None:
    assert "echo" in run_cli("--help").stdout
    result = run_cli("echo", "hi there")
    assert result.returncode == 0 and result.stdout == "hi there\n"


def test_a_disabled_plugin_adds_no_command() -> None:
    result = run_cli("echo", "hi", env={"KIAPI_DISABLE_PLUGINS": "echo"})
    assert result.returncode == 2 and "No such command 'echo'" in result.stderr


# -- config ----------------------------------------------------------------------------------
def test_config_masks_the_api_key() -> None:
    text = run_cli("config", env={"KIAPI_API_KEY": SECRET})
    as_json = run_cli("config", "--json", env={"KIAPI_API_KEY": SECRET})
    for result in (text, as_json):
        assert result.returncode == 0, result.stderr
        assert SECRET not in result.stdout + result.stderr
    assert "KIAPI_API_KEY=***" in text.stdout.splitlines()
    assert json.loads(as_json.stdout)["api_key"] == "***"


def test_config_shows_effective_values(tmp_path: Path) -> None:
    env = {"KIAPI_MAX_QUEUE": "7", "KIAPI_PLUGINS": "echo,other", "KIAPI_HOME": str(tmp_path)}
    lines = run_cli("config", env=env).stdout.splitlines()
    assert "KIAPI_MAX_QUEUE=7" in lines
    assert "KIAPI_PLUGINS=echo,other" in lines
    assert f"KIAPI_HOME={tmp_path}" in lines
    assert "KIAPI_HOST=127.0.0.1" in lines  # loopback unless told otherwise
    # Unset values are comments: pasting `KIAPI_API_KEY=None` back would set a key "None".
    assert "# KIAPI_API_KEY is not set" in lines


def test_invalid_settings_are_one_clear_line_per_field() -> None:
    result = run_cli("config", env={"KIAPI_MAX_QUEUE": "lots", "KIAPI_PORT": "70000"})
    assert result.returncode == 1
    assert "KIAPI_MAX_QUEUE:" in result.stderr and "KIAPI_PORT:" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_empty_api_key_is_refused() -> None:
    result = run_cli("config", env={"KIAPI_API_KEY": "  "})
    assert result.returncode == 1 and "KIAPI_API_KEY" in result.stderr


# -- the TOML config file --------------------------------------------------------------------
def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kiapi.toml"
    path.write_text(text)
    return path


def test_config_file_values_apply_and_env_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _toml(
        tmp_path,
        'max_queue = 5\nplugins = ["echo"]\napi_key = "from-file"\nsync_timeout_s = 12.5\n'
        "[some_plugin]\nanything = 1\n",
    )
    monkeypatch.setenv("KIAPI_CONFIG", str(path))
    settings = Settings()
    assert settings.max_queue == 5
    assert settings.plugins == ["echo"]
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "from-file"
    assert settings.sync_timeout_s == 12.5
    monkeypatch.setenv("KIAPI_MAX_QUEUE", "9")
    assert Settings().max_queue == 9
    # Arguments (what `kiapi serve --port` passes) win over both.
    assert Settings(max_queue=11).max_queue == 11


def test_the_default_config_file_lives_in_kiapi_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config.toml").write_text("workers = 3\n")
    monkeypatch.setenv("KIAPI_HOME", str(tmp_path))
    assert Settings().workers == 3


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("max_qeue = 5\n", "unknown setting(s) max_qeue"),
        ("max_queue = \n", "config file"),
        ('max_queue = "many"\n', "KIAPI_MAX_QUEUE"),
    ],
)
def test_a_bad_config_file_is_a_clear_cli_error(tmp_path: Path, text: str, says: str) -> None:
    result = run_cli("config", env={"KIAPI_CONFIG": str(_toml(tmp_path, text))})
    assert result.returncode == 1
    assert says in result.stderr and "Traceback" not in result.stderr


def test_a_named_config_file_that_is_missing_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KIAPI_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigFileError, match="no such file"):
        Settings()


# -- the environment (EnvSettings) ----------------------------------------------------------
def test_environment_names_match_in_any_case_and_strangers_are_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("kiapi_max_queue", "7")
    monkeypatch.setenv("KIAPI_NOT_A_SETTING", "x")  # may be a plugin's: no error
    monkeypatch.setenv("KIAPI_CORS_ORIGINS", "http://a.test, http://b.test,")
    monkeypatch.setenv("KIAPI_PLUGINS", "")
    settings = Settings()
    assert settings.max_queue == 7
    assert settings.cors_origins == ["http://a.test", "http://b.test"]
    assert settings.plugins == []  # set but empty: load none, unlike unset (load all)
    monkeypatch.setenv("KIAPI_STRICT_PLUGINS", "yes")
    assert Settings().strict_plugins is True


def test_a_plugins_env_settings_read_their_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import Field, ValidationError

    from kiapi_core import EnvSettings

    class Shout(EnvSettings):
        env_prefix = "KIAPI_SHOUT_"
        volume: int = Field(3, ge=1, le=11)

    assert Shout().volume == 3
    monkeypatch.setenv("KIAPI_VOLUME", "5")  # the host's prefix is not the plugin's
    assert Shout().volume == 3
    monkeypatch.setenv("KIAPI_SHOUT_VOLUME", "11")
    assert Shout().volume == 11
    assert Shout(volume=4).volume == 4
    monkeypatch.setenv("KIAPI_SHOUT_VOLUME", "12")
    with pytest.raises(ValidationError) as caught:
        Shout()
    error = caught.value.errors()[0]
    assert error["loc"] == ("volume",) and "11" in error["msg"]
    assert "12" not in str(caught.value)  # a refused value is not echoed (it may be a secret)


def test_env_settings_read_a_literal_of_ints_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Literal[4, 8] compares the value as is: without help "8" from the environment is refused.
    from typing import Literal

    from pydantic import ValidationError

    from kiapi_core import EnvSettings

    class Quant(EnvSettings):
        env_prefix = "KIAPI_QUANT_"
        bits: Literal[4, 8] | None = None
        mode: Literal["fast", "4"] = "fast"

    assert Quant().bits is None
    monkeypatch.setenv("KIAPI_QUANT_BITS", " 8 ")
    assert Quant().bits == 8
    monkeypatch.setenv("KIAPI_QUANT_MODE", "4")  # a string choice stays a string
    assert Quant().mode == "4"
    monkeypatch.setenv("KIAPI_QUANT_BITS", "6")
    with pytest.raises(ValidationError) as caught:
        Quant()
    error = caught.value.errors()[0]
    assert error["loc"] == ("bits",) and "4" in error["msg"] and "8" in error["msg"]


def test_serve_starts_without_pydantic_settings(tmp_path: Path) -> None:
    # pydantic-settings' import alone was ~40 ms of a ~0.3 s restart (docs/performance.md).
    code = (
        "import sys; from kiapi_core.app import create_app; from kiapi_core.settings import"
        " Settings; create_app(Settings());"
        " print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('pydantic_settings', 'dotenv')))"
    )
    env = {**os.environ, "KIAPI_HOME": str(tmp_path)}
    env.pop("KIAPI_PLUGINS", None)  # every installed plugin, as a user runs it
    # The first start in a home validates the merged OpenAPI document (openapi-spec-validator
    # imports pydantic-settings); a restart finds it in the home's cache, as every later one.
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
        )
        assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# -- serve -----------------------------------------------------------------------------------
def test_serve_binds_the_given_host_and_port(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kiapi_core.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={**_env(tmp_path), "KIAPI_PLUGINS": "echo", "KIAPI_PORT": "1"},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        assert response.status_code == 200
        assert response.json()["status"] == "ok"
    finally:
        proc.terminate()
        # uvicorn shuts down cleanly, then re-raises the signal it caught.
        assert proc.wait(15) in (0, -signal.SIGTERM)
    text = log.read_text()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in text
    assert "Application shutdown complete" in text


def test_serve_reports_invalid_flags(tmp_path: Path) -> None:
    result = run_cli("serve", "--port", "99999", env=_env(tmp_path))
    assert result.returncode == 1
    assert "KIAPI_PORT" in result.stderr and "Traceback" not in result.stderr


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "KIAPI_HOME": str(tmp_path / "home")}
