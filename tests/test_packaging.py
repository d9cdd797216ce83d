"""The two distributions as an index would get them, plain pip on Linux from the built wheels,
and the one lock resolved per mlx backend and platform."""

from __future__ import annotations

import email.parser
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import ROOT, free_port, uv

from kiapi_core.cli.install import UNUSED_DEPENDENCIES

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)")


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [uv(), "build", "--all-packages", "-q", "-o", str(out)], cwd=ROOT, check=True, timeout=300
    )
    found = {p.name: p for p in out.iterdir() if p.suffix in (".whl", ".gz")}
    return {
        "host-wheel": found["kiapi_core-0.1.0-py3-none-any.whl"],
        "host-sdist": found["kiapi_core-0.1.0.tar.gz"],
        "plugin-wheel": found["kiapi_ideogram4-0.1.0-py3-none-any.whl"],
        "plugin-sdist": found["kiapi_ideogram4-0.1.0.tar.gz"],
    }


# -- 7. publishing metadata -------------------------------------------------------------------


def test_twine_check_strict_passes_for_both(dists: dict[str, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, dists.values())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 4


def _sdist_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return [name.split("/", 1)[1] for name in tar.getnames() if "/" in name]


def test_sdists_hold_their_own_distribution_only(dists: dict[str, Path]) -> None:
    host = _sdist_names(dists["host-sdist"])
    for name in host:
        assert not name.startswith(("plugins/", ".ci/", "bench/")), name
        assert name != "uv.lock" and not name.endswith(".png"), name
    assert {"LICENSE", "README.md", "pyproject.toml", "kiapi_core/__init__.py"} <= set(host)
    plugin = _sdist_names(dists["plugin-sdist"])
    assert {"LICENSE", "README.md", "pyproject.toml", "kiapi_ideogram4/plugin.py"} <= set(plugin)
    # Sources and tests only: no member anywhere near the size of a screenshot or a lock, and
    # the whole a few hundred KB compressed (it grows with the code, not by leaps).
    with tarfile.open(dists["host-sdist"]) as tar:
        biggest = max(tar.getmembers(), key=lambda m: m.size)
    assert biggest.size < 200_000, biggest.name
    assert dists["host-sdist"].stat().st_size < 800_000


def _wheel_metadata(wheel: Path) -> tuple[email.message.Message, list[str]]:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(meta).decode()), names


@pytest.mark.parametrize("which", ["host-wheel", "plugin-wheel"])
def test_wheels_carry_license_urls_classifiers_and_absolute_links(
    dists: dict[str, Path], which: str
) -> None:
    meta, names = _wheel_metadata(dists[which])
    assert meta["License-Expression"] == "Apache-2.0"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert meta["Author"] and meta["Description-Content-Type"] == "text/markdown"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert urls["Repository"].startswith("https://")
    assert "Programming Language :: Python :: 3.11" in (meta.get_all("Classifier") or [])
    description = meta.get_payload()
    assert isinstance(description, str) and len(description) > 500
    # An index page has no repository around it: every link must stand on its own.
    relative = [link for link in LINK.findall(description) if not link.startswith("https://")]
    assert relative == []


def test_both_licenses_are_the_declared_apache_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert (ROOT / "plugins" / "ideogram4" / "LICENSE").read_text() == text


# -- 3. plain pip on Linux from the built wheels ----------------------------------------------


def _venv_size(venv: Path) -> int:
    return sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())


def _distributions(python: Path) -> dict[str, str]:
    probe = (
        "import json; from importlib import metadata as m;"
        "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))"
    )
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


@pytest.fixture(scope="module")
def pip_env(dists: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`python -m venv v && v/bin/pip install <host> && v/bin/kiapi install <plugin>`."""
    venv = tmp_path_factory.mktemp("plain-pip") / "v"
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")
    }
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(dists["host-wheel"])],
        check=True,
        env=env,
        timeout=600,
    )
    plugin = subprocess.run(
        [str(venv / "bin" / "kiapi"), "install", str(dists["plugin-wheel"])],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert plugin.returncode == 0, plugin.stderr[-3000:]
    # No uv in that venv and it is not uv-made: pip did it.
    assert re.search(
        rf"^\$ {re.escape(str(venv))}/bin/python[0-9.]* -m pip install --no-deps",
        plugin.stderr,
        re.M,
    )
    print(f"plain pip env: {time.monotonic() - started:.0f} s, {_venv_size(venv) / 2**20:.0f} MiB")
    yield venv


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's mlx rules")
def test_plain_pip_gives_a_small_cpu_env_without_torch(
    pip_env: Path, dists: dict[str, Path]
) -> None:
    python = pip_env / "bin" / "python"
    before = _distributions(python)
    assert not [d for d in before if d in UNUSED_DEPENDENCIES["mflux"] or d.startswith("nvidia")]
    assert {"mlx", "mlx-cpu", "mflux", "kiapi-core", "kiapi-ideogram4"} <= set(before)
    assert not {"mlx-cuda-12", "mlx-cuda-13"} & set(before)
    # 6 GB with `pip install kiapi-ideogram4` (torch, triton, opencv, nvidia); ~400 MB here.
    assert _venv_size(pip_env) < 700 * 2**20
    device = subprocess.run(
        [str(python), "-c", "import mlx.core as mx; print(mx.default_device())"],
        capture_output=True,
        text=True,
    )
    assert device.stdout.strip() == "Device(cpu, 0)", device.stderr

    plugins = subprocess.run(
        [str(pip_env / "bin" / "kiapi"), "plugins", "--json"], capture_output=True, text=True
    )
    rows = {row["name"]: row for row in json.loads(plugins.stdout)}
    assert rows["ideogram4"]["status"] == "loaded", rows["ideogram4"]["errors"]

    # Idempotent: the same command again changes nothing.
    again = subprocess.run(
        [str(pip_env / "bin" / "kiapi"), "install", str(dists["plugin-wheel"])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert _distributions(python) == before


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's mlx rules")
def test_plain_pip_env_generates_an_image(pip_env: Path, tmp_path: Path) -> None:
    """The env serves a real (tiny-weights) generation through the plugin, with its BLAS."""
    python = pip_env / "bin" / "python"
    kiapi = str(pip_env / "bin" / "kiapi")
    home = tmp_path / "home"
    env = {**os.environ, "KIAPI_HOME": str(home), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("VIRTUAL_ENV", None)
    weights = tmp_path / "tiny"
    build = (
        "import sys; from kiapi_ideogram4.testing import build_tiny_checkpoint as b; b(sys.argv[1])"
    )
    subprocess.run([str(python), "-c", build, str(weights)], check=True, env=env, timeout=300)
    subprocess.run([kiapi, "activate", "ideogram4", "--path", str(weights)], check=True, env=env)
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [kiapi, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        response = httpx.post(
            url + "/v1/image/ideogram4/generate",
            json={"prompt": "hi", "width": 256, "height": 256, "seed": 1, "preset": "V4_TURBO_12"},
            timeout=600,
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert response.content.startswith(b"\x89PNG")
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def test_export_from_an_installed_host_needs_out(pip_env: Path, tmp_path: Path) -> None:
    python = str(pip_env / "bin" / "python")
    # Not from the checkout (`-m` would import ./kiapi_core from there): the installed copy.
    bare = subprocess.run(
        [python, "-m", "kiapi_core.export"], capture_output=True, text=True, cwd=tmp_path
    )
    assert bare.returncode == 2 and "--out DIR is required" in bare.stderr
    written = subprocess.run(
        [python, "-m", "kiapi_core.export", "--out", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
    )
    assert written.returncode == 0, written.stderr
    # The installed wheel exports what the checkout commits.
    for name in ("openapi.json", "ideogram4.openapi.json"):
        assert (tmp_path / "s" / name).read_text() == (ROOT / "schemas" / name).read_text()
    assert not list(pip_env.glob("lib/python3*/site-packages/schemas"))


# -- 5 + 6. one lock: each mlx backend, each platform -----------------------------------------

LINUX_X86 = "x86_64-manylinux_2_35"
LINUX_ARM = "aarch64-manylinux_2_35"
MAC_ARM = "aarch64-apple-darwin"  # with MACOSX_DEPLOYMENT_TARGET=14.0
NO_MLX = ["x86_64-apple-darwin", "x86_64-unknown-linux-musl", "x86_64-manylinux_2_31"]


def _dry_sync(tmp_path: Path, platform: str, *args: str) -> tuple[int, set[str], str]:
    """`uv sync --locked --dry-run` for ``platform`` into an empty env: (exit, names, output)."""
    env = {
        **os.environ,
        "UV_PROJECT_ENVIRONMENT": str(tmp_path / f"env-{platform}"),
        "MACOSX_DEPLOYMENT_TARGET": "14.0",
    }
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(
        [uv(), "sync", "--locked", "--dry-run", "--python-platform", platform, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    names = set(re.findall(r"^ \+ ([A-Za-z0-9_.-]+)(?:==| @)", output, re.M))
    return result.returncode, names, output


BACKEND_DISTS = {"mlx-cpu", "mlx-cuda-12", "mlx-cuda-13", "mlx-metal"}


@pytest.mark.parametrize(
    ("platform", "extra", "backend"),
    [
        (LINUX_X86, "cpu", "mlx-cpu"),
        (LINUX_ARM, "cpu", "mlx-cpu"),
        (LINUX_X86, "cuda12", "mlx-cuda-12"),
        (LINUX_X86, "cuda13", "mlx-cuda-13"),
        (LINUX_ARM, "cuda13", "mlx-cuda-13"),
        (MAC_ARM, "cpu", "mlx-metal"),
        (MAC_ARM, "cuda13", "mlx-metal"),
    ],
)
def test_the_lock_gives_each_backend_alone(
    tmp_path: Path, platform: str, extra: str, backend: str
) -> None:
    code, names, output = _dry_sync(tmp_path, platform, "--all-packages", "--extra", extra)
    assert code == 0, output
    assert {"kiapi-core", "kiapi-ideogram4", "mflux", "mlx", backend} <= names
    assert names & BACKEND_DISTS == {backend}
    assert not names & set(UNUSED_DEPENDENCIES["mflux"])
    has_cuda_libs = any(n.startswith("nvidia") for n in names)
    assert has_cuda_libs == backend.startswith("mlx-cuda")


def test_two_backends_at_once_are_refused(tmp_path: Path) -> None:
    args = ("--all-packages", "--extra", "cpu", "--extra", "cuda13")
    code, _, output = _dry_sync(tmp_path, LINUX_X86, *args)
    assert code != 0 and "incompatible with the declared conflicts" in output
    exported = subprocess.run(
        [uv(), "export", "--frozen", "--all-packages", "--extra", "cpu", "--extra", "cuda13"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert exported.returncode != 0 and "conflicts" in exported.stderr


@pytest.mark.parametrize("extra", ["cpu", "cuda12", "cuda13"])
def test_export_per_extra_names_its_linux_backend(extra: str) -> None:
    exported = subprocess.run(
        [uv(), "export", "--frozen", "--all-packages", "--no-hashes", "--extra", extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = {line.split("==")[0]: line for line in exported.splitlines() if "==" in line}
    wanted = {"cpu": "mlx-cpu", "cuda12": "mlx-cuda-12", "cuda13": "mlx-cuda-13"}[extra]
    assert "sys_platform == 'linux'" in lines[wanted]
    assert not (set(lines) & BACKEND_DISTS) - {wanted, "mlx-metal"}
    assert "sys_platform == 'darwin'" in lines["mlx-metal"]
    assert not set(lines) & set(UNUSED_DEPENDENCIES["mflux"])


@pytest.mark.parametrize("platform", NO_MLX)
def test_without_mlx_wheels_the_host_alone_installs(tmp_path: Path, platform: str) -> None:
    code, _, output = _dry_sync(tmp_path, platform, "--all-packages", "--extra", "cpu")
    assert code != 0 and "mlx" in output and "only has wheels for" in output
    code, names, output = _dry_sync(tmp_path, platform, "--no-group", "plugins")
    assert code == 0, output
    assert "kiapi-core" in names and "pytest" in names
    assert not {"kiapi-ideogram4", "mflux", "mlx"} & names


def test_intel_macs_and_windows_get_the_host_alone_by_default(tmp_path: Path) -> None:
    for platform in ("x86_64-apple-darwin", "x86_64-pc-windows-msvc"):
        code, names, output = _dry_sync(tmp_path, platform)
        assert code == 0, output
        assert "kiapi-core" in names and not {"kiapi-ideogram4", "mlx"} & names


def test_the_lock_must_cover_every_platform_mlx_has_wheels_for() -> None:
    import tomllib

    with (ROOT / "uv.lock").open("rb") as fh:
        lock = tomllib.load(fh)
    assert sorted(lock["required-markers"]) == sorted(
        [
            "platform_machine == 'x86_64' and sys_platform == 'linux'",
            "platform_machine == 'aarch64' and sys_platform == 'linux'",
            "platform_machine == 'arm64' and sys_platform == 'darwin'",
        ]
    )
