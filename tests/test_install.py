"""Installs as new users try them: the host's own name, ``kiapi install``, the README's commands
on a Debian/Ubuntu Python that is externally managed (PEP 668)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from helpers import PLUGINS, ROOT, free_port, installed, run_cli
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_readme import install_step

from kiapi_core.cli.install import (
    BACKENDS,
    UNUSED_DEPENDENCIES,
    _apply_backend,
    _expand,
    default_backend,
    split_requirements,
)
from kiapi_core.version import DISTRIBUTION


def _project(path: Path) -> dict[str, object]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


HOST = _project(ROOT / "pyproject.toml")["project"]
assert isinstance(HOST, dict)


def _host_requirement(dependencies: list[str]) -> Requirement:
    wanted = canonicalize_name(str(HOST["name"]))
    found = [
        Requirement(d) for d in dependencies if canonicalize_name(Requirement(d).name) == wanted
    ]
    assert len(found) == 1, dependencies
    return found[0]


# -- 1. the host's distribution name ----------------------------------------------------------


def test_plugins_depend_on_the_hosts_distribution_name() -> None:
    assert HOST["name"] == DISTRIBUTION == "kiapi-core"
    plugin = _project(ROOT / "plugins" / "ideogram4" / "pyproject.toml")
    req = _host_requirement(plugin["project"]["dependencies"])  # type: ignore[index]
    assert req.specifier.contains(str(HOST["version"]))
    assert plugin["tool"]["uv"]["sources"] == {DISTRIBUTION: {"workspace": True}}  # type: ignore[index]
    # The test plugin and the documented one name it too; `kiapi` (another project) nowhere.
    echo = _project(PLUGINS / "echo" / "pyproject.toml")
    assert _host_requirement(echo["project"]["dependencies"]).specifier.contains("0.1.0")  # type: ignore[index]
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert 'dependencies = ["kiapi-core>=0.1,<0.2"]' in docs
    for text in [
        docs,
        (ROOT / "README.md").read_text(),
        (ROOT / "docs" / "scale-out.md").read_text(),
    ]:
        assert not re.search(r"""['"]kiapi(\[|[<>=])""", text)


def test_the_host_is_installed_under_that_name() -> None:
    assert metadata.version(DISTRIBUTION) == HOST["version"]
    scripts = {ep.name for ep in metadata.distribution(DISTRIBUTION).entry_points}
    assert "kiapi" in scripts
    result = run_cli("--version")
    assert result.returncode == 0 and f"version {HOST['version']}" in result.stdout


# -- 2. kiapi install's rules for mlx plugins, on the real metadata ---------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="the mlx backend rules are Linux's")
def test_mlx_plugins_get_the_chosen_backend_and_no_torch() -> None:
    wanted, without_deps = split_requirements(["kiapi-ideogram4"], "cpu")
    assert without_deps == ["mflux==0.24.0"]
    # The host's own requirement is checked, never handed to an installer (no index has it).
    assert not any(Requirement(r).name == DISTRIBUTION for r in wanted)
    expanded = _expand(without_deps)
    names = {canonicalize_name(Requirement(r).name) for r in expanded}
    assert names.isdisjoint(UNUSED_DEPENDENCIES["mflux"]) and "transformers" in names
    for backend, dist in BACKENDS.items():
        final, uses_mlx = _apply_backend(wanted + expanded, backend)
        assert uses_mlx
        assert f"mlx[{backend}]==0.32.2" in final
        others = set(BACKENDS.values()) - {dist}
        assert not {canonicalize_name(Requirement(r).name) for r in final} & others
    # This environment, where the plugin's tests run mflux for real, has none of them.
    assert not [name for name in UNUSED_DEPENDENCIES["mflux"] if installed(name)]
    assert default_backend() == "cpu"


def test_uninstall_keeps_the_host_and_skips_what_is_missing() -> None:
    refused = run_cli("uninstall", DISTRIBUTION)
    assert refused.returncode == 1 and "is kiapi itself" in refused.stderr
    assert installed(DISTRIBUTION)
    missing = run_cli("uninstall", "kiapi-not-installed-anywhere")
    assert missing.returncode == 0 and "is not installed" in missing.stderr


# -- 2 + 4. the README's commands with Debian's python3 only; plugins survive a rerun ---------

DEBIAN_PYTHON = Path("/usr/bin/python3")
TINY = """[project]
name = "kiapi-tiny"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = ["kiapi-core>=0.1,<0.2"]

[project.entry-points.kiapi]
tiny = "kiapi_tiny"

[build-system]
requires = ["hatchling>=1.25"]
build-backend = "hatchling.build"

[tool.hatch.build.targets.wheel]
include = ["kiapi_tiny.py"]
"""


def _externally_managed(python: Path) -> bool:
    if not python.is_file():
        return False
    stdlib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return bool(stdlib) and (Path(stdlib) / "EXTERNALLY-MANAGED").is_file()


def _checkout_copy(dest: Path) -> None:
    """What `git clone` gives (tracked files), plus files not committed yet."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            (dest / source.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / source.relative_to(ROOT))


def _system_env(home: Path) -> dict[str, str]:
    # Only system directories on PATH: no pyenv, no uv, no pip but the ones the commands make.
    keep = ("HOME", "LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE", "HTTP_PROXY", "HTTPS_PROXY")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith(("PIP_", "UV_"))}
    env.pop("UV_PROJECT_ENVIRONMENT", None)
    return {**env, "PATH": "/usr/bin:/bin", "KIAPI_HOME": str(home)}


@pytest.mark.skipif(
    not _externally_managed(DEBIAN_PYTHON),
    reason="needs Debian/Ubuntu's externally managed python3",
)
def test_readme_install_on_debian_python_keeps_kiapi_installed_plugins(tmp_path: Path) -> None:
    repo = tmp_path / "kiapi"
    _checkout_copy(repo)
    env = _system_env(tmp_path / "home")
    assert shutil.which("uv", path=env["PATH"]) is None
    step = install_step()

    def sh(command: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, shell=True, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
        )

    started = time.monotonic()
    first = sh(step)
    assert first.returncode == 0, first.stderr[-3000:]
    first_s = time.monotonic() - started
    venv = repo / ".venv"
    base = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sys; print(sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert base == sysconfig.get_config_var("prefix") or base == "/usr"

    (tmp_path / "kiapi-tiny").mkdir()
    (tmp_path / "kiapi-tiny" / "pyproject.toml").write_text(TINY)
    (tmp_path / "kiapi-tiny" / "kiapi_tiny.py").write_text('"""A throwaway plugin."""\n')
    for _ in range(2):  # idempotent
        added = sh(f".venv/bin/kiapi install {tmp_path / 'kiapi-tiny'}")
        assert added.returncode == 0, added.stderr[-3000:]

    def plugins() -> dict[str, str]:
        listed = sh(".venv/bin/kiapi plugins --json")
        assert listed.returncode == 0, listed.stderr
        return {row["name"]: row["status"] for row in json.loads(listed.stdout)}

    assert plugins()["tiny"] == "loaded"
    started = time.monotonic()
    again = sh(step)
    assert again.returncode == 0, again.stderr[-3000:]
    again_s = time.monotonic() - started
    after = plugins()
    assert after["tiny"] == "loaded" and after["ideogram4"] == "loaded"
    device = sh(".venv/bin/python -c 'import mlx.core as mx; print(mx.default_device())'")
    assert device.stdout.strip() == "Device(cpu, 0)", device.stderr

    # The serve command's last part, as written, on a free port.
    port = free_port()
    server = subprocess.Popen(
        [".venv/bin/kiapi", "serve", "--port", str(port)],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and status != 200:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code
            except httpx.HTTPError:
                time.sleep(0.2)
        assert status == 200
    finally:
        server.terminate()
        server.wait(30)
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    print(f"README install: {first_s:.0f} s, rerun {again_s:.0f} s, .venv {size / 2**20:.0f} MiB")
