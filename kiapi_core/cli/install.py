"""``kiapi install`` / ``kiapi uninstall``: plugins go into the environment kiapi runs in.

Like ``llm install``: the user names a plugin (an index name, a path, a wheel) and it lands next
to the running host, whatever made that environment: uv when uv made it (or ships in it), pip
otherwise. The same command a second time changes nothing.

mlx-based plugins get the platform's rules, which no installer applies by itself:

- some libraries declare far more than the code paths kiapi runs import (mflux asks for torch,
  opencv, matplotlib, ...: gigabytes, CUDA included). Those are installed without their
  dependencies, then with their declared ones minus :data:`UNUSED_DEPENDENCIES`;
- on Linux, mlx's backend (``mlx-cpu``, ``mlx-cuda-12``, ``mlx-cuda-13``) is the user's choice
  (``--mlx``), never what a library asks for: every backend ships ``mlx/lib/libmlx.so``, so two
  installed at once leave ``import mlx.core`` broken while pip reports nothing wrong. A switch
  removes the other backends first. macOS gets Metal from mlx's own metadata.

These rules apply to the named plugins' direct requirements, where mlx plugins name mflux/mlx.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from kiapi_core.version import DISTRIBUTION

if TYPE_CHECKING:
    from packaging.requirements import Requirement

# Per library: declared dependencies that nothing kiapi runs imports (checked by the ideogram4
# plugin's tests, which run mflux's real code path in an environment without them).
UNUSED_DEPENDENCIES: dict[str, frozenset[str]] = {
    "mflux": frozenset(
        {
            "torch",
            "opencv-python",
            "matplotlib",
            "hf-transfer",
            "sentencepiece",
            "fonttools",
            "protobuf",
        }
    ),
}

# mlx's extras on Linux and the distribution each one adds.
BACKENDS: dict[str, str] = {"cpu": "mlx-cpu", "cuda12": "mlx-cuda-12", "cuda13": "mlx-cuda-13"}


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


@dataclass
class Installer:
    """One way to run installs against ``python``: ``uv pip ... --python`` or ``python -m pip``."""

    kind: str  # "uv" | "pip"
    python: str
    uv: str | None = None

    def _base(self, verb: str) -> list[str]:
        if self.kind == "uv":
            assert self.uv is not None
            return [self.uv, "pip", verb, "--python", self.python]
        return [self.python, "-m", "pip", verb, *(["-y"] if verb == "uninstall" else [])]

    def run(self, verb: str, *args: str) -> None:
        import shlex

        argv = [*self._base(verb), *args]
        click.echo("$ " + shlex.join(argv), err=True)
        # pip's "already satisfied" chatter and uv's summaries go to the user's terminal.
        result = subprocess.run(argv, check=False)
        if result.returncode != 0:
            raise click.ClickException(f"{self.kind} {verb} failed (exit {result.returncode})")


def _uv_made(prefix: Path) -> bool:
    try:
        lines = (prefix / "pyvenv.cfg").read_text().splitlines()
    except OSError:
        return False
    return any(line.split("=", 1)[0].strip() == "uv" for line in lines)


def _find_uv() -> str | None:
    # uv installed into this very environment (`pip install uv`) first, then the one on PATH.
    here = Path(sys.executable).parent / ("uv.exe" if os.name == "nt" else "uv")
    if here.is_file():
        return str(here)
    return shutil.which("uv")


def _has_pip() -> bool:
    import importlib.util

    return importlib.util.find_spec("pip") is not None


def choose_installer(preference: str = "auto") -> Installer:
    """uv when it made this environment or lives in it, pip otherwise; ``preference`` forces."""
    uv = _find_uv()
    if preference == "uv" or (preference == "auto" and uv and _uv_made(Path(sys.prefix))):
        if uv is None:
            raise click.ClickException("uv not found: install it (`pip install uv`) or use pip")
        return Installer("uv", sys.executable, uv)
    in_env = uv is not None and Path(uv).parent == Path(sys.executable).parent
    if preference == "auto" and in_env:
        return Installer("uv", sys.executable, uv)
    if _has_pip():
        return Installer("pip", sys.executable)
    if preference == "auto" and uv is not None:
        return Installer("uv", sys.executable, uv)
    raise click.ClickException(
        f"{sys.executable} has no pip (`{sys.executable} -m ensurepip`) and no uv is on PATH"
    )


# -- what a target names ----------------------------------------------------------------------


def target_name(target: str) -> str | None:
    """The distribution a ``kiapi install`` argument installs, when it says so without building."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import parse_sdist_filename, parse_wheel_filename

    path = Path(target)
    if target.endswith(".whl"):
        return _canonical(parse_wheel_filename(path.name)[0])
    if target.endswith((".tar.gz", ".zip")) and path.is_file():
        return _canonical(parse_sdist_filename(path.name)[0])
    if path.is_dir():
        import tomllib

        try:
            with (path / "pyproject.toml").open("rb") as fh:
                return _canonical(tomllib.load(fh)["project"]["name"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return None
    try:
        return _canonical(Requirement(target).name)
    except InvalidRequirement:
        return None


def _installed() -> dict[str, str]:
    from importlib import invalidate_caches, metadata

    invalidate_caches()
    return {_canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}


def _requirements(name: str, extras: set[str]) -> list[Requirement]:
    """``name``'s installed requirements that apply here, with ``extras`` on."""
    from importlib import invalidate_caches, metadata

    from packaging.requirements import Requirement

    invalidate_caches()
    out = []
    for line in metadata.requires(name) or []:
        req = Requirement(line)
        if req.marker is None or any(
            req.marker.evaluate({"extra": extra}) for extra in (extras or {""})
        ):
            req.marker = None
            out.append(req)
    return out


def _extras(name: str) -> set[str]:
    from importlib import metadata

    return {_canonical(e) for e in metadata.metadata(name).get_all("Provides-Extra") or []}


def default_backend() -> str | None:
    """The mlx backend to keep: the one installed, else ``cpu``; ``None`` off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    installed = _installed()
    present = [extra for extra, dist in BACKENDS.items() if dist in installed]
    return present[0] if len(present) == 1 else "cpu"


def split_requirements(names: list[str], backend: str | None) -> tuple[list[str], list[str]]:
    """The installed plugins' requirements: (resolve normally, install without dependencies).

    A plugin's extra named like the backend (kiapi-ideogram4[cpu]) is switched on; the host's own
    requirement is checked, never handed to the installer (the host may not be on any index).
    """
    host = _canonical(DISTRIBUTION)
    wanted: list[str] = []
    without_deps: list[str] = []
    for name in names:
        extras = {backend} if backend and backend in _extras(name) else set()
        for req in _requirements(name, extras):
            key = _canonical(req.name)
            if key == host:
                _check_host(name, req)
            elif key in UNUSED_DEPENDENCIES:
                without_deps.append(str(req))
            else:
                wanted.append(str(req))
    return wanted, without_deps


def _check_host(plugin: str, req: Requirement) -> None:
    from kiapi_core.version import host_version

    version = host_version()
    if not req.specifier.contains(version, prereleases=True):
        raise click.ClickException(
            f"{plugin} needs {req} but this is {DISTRIBUTION} {version}:"
            f" upgrade the host first (`pip install -U {DISTRIBUTION}`)"
        )


def _expand(without_deps: list[str]) -> list[str]:
    """The declared requirements of the libraries installed without theirs, minus the unused."""
    from packaging.requirements import Requirement

    out = []
    for line in without_deps:
        req = Requirement(line)
        unused = UNUSED_DEPENDENCIES[_canonical(req.name)]
        for dep in _requirements(req.name, set(req.extras)):
            if _canonical(dep.name) not in unused:
                out.append(str(dep))
    return out


def _apply_backend(requirements: list[str], backend: str | None) -> tuple[list[str], bool]:
    """Every mlx requirement with the chosen backend as its extra; other backends dropped."""
    from packaging.requirements import Requirement

    out = []
    uses_mlx = False
    for line in requirements:
        req = Requirement(line)
        key = _canonical(req.name)
        if key == "mlx":
            uses_mlx = True
            if backend is not None:
                req.extras = {backend}
        elif key in BACKENDS.values():
            uses_mlx = True
            if backend is None or key != BACKENDS[backend]:
                continue
        out.append(str(req))
    return out, uses_mlx


def install_plugins(
    targets: list[str], backend: str | None, installer: Installer, *, upgrade: bool, editable: bool
) -> list[str]:
    """Install ``targets``; returns their distribution names."""
    from packaging.requirements import Requirement

    before = _installed()
    # The plugins alone first: their metadata, read from the environment, drives the rest.
    first = ["--no-deps", *(["--upgrade"] if upgrade else [])]
    paths = [arg for target in targets for arg in (["-e", target] if editable else [target])]
    installer.run("install", *first, *paths)
    after = _installed()
    names = []
    for target in targets:
        name = target_name(target)
        if name is None:
            new = sorted(set(after) - set(before))
            if len(new) != 1:
                raise click.ClickException(f"cannot tell which distribution {target} installed")
            name = new[0]
        if name not in after:
            raise click.ClickException(f"{target} did not install a distribution named {name}")
        names.append(name)

    wanted, without_deps = split_requirements(names, backend)
    if without_deps:
        installer.run("install", "--no-deps", *without_deps)
    wanted, uses_mlx = _apply_backend(wanted + _expand(without_deps), backend)
    if uses_mlx and backend is not None:
        _switch_backend(installer, backend)
    if wanted:
        installer.run("install", *wanted)
    if without_deps and installer.kind == "pip":
        left_out = sorted(
            set().union(
                *(UNUSED_DEPENDENCIES[_canonical(Requirement(r).name)] for r in without_deps)
            )
        )
        click.echo(
            f"(pip's complaints about {', '.join(left_out)} not being installed are expected:"
            " kiapi never imports them)",
            err=True,
        )
    if uses_mlx:
        _check_mlx()
    return names


def _switch_backend(installer: Installer, backend: str) -> None:
    """Other backends out before the chosen one goes in: they overwrite each other's libmlx.so."""
    installed = _installed()
    others = [dist for dist in BACKENDS.values() if dist in installed and dist != BACKENDS[backend]]
    if others:
        mine = BACKENDS[backend]
        # The chosen one too, if present: its libmlx.so may be another backend's by now.
        installer.run("uninstall", *others, *([mine] if mine in installed else []))


def _check_mlx() -> None:
    probe = "import mlx.core as mx; print(mx.default_device())"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["?"])[-1]
        raise click.ClickException(f"installed, but `import mlx.core` fails: {tail}")
    click.echo(f"mlx: {result.stdout.strip()}", err=True)


INSTALLER_OPTION = click.option(
    "--installer",
    type=click.Choice(["auto", "uv", "pip"]),
    default="auto",
    show_default=True,
    help="auto: uv when it made (or lives in) this environment, else pip.",
)


@click.command()
@click.argument("targets", nargs=-1, required=True)
@click.option(
    "--mlx",
    "backend",
    type=click.Choice(sorted(BACKENDS)),
    default=None,
    help="Linux: mlx's backend for mlx-based plugins (default: the installed one, else cpu)."
    " cuda13 needs an NVIDIA driver >= 580, cuda12 older ones. macOS always uses Metal.",
)
@click.option("--upgrade", "-U", is_flag=True, help="Upgrade the named plugins.")
@click.option("--editable", "-e", is_flag=True, help="Install local paths editable.")
@INSTALLER_OPTION
def install(
    targets: tuple[str, ...], backend: str | None, upgrade: bool, editable: bool, installer: str
) -> None:
    """Install plugins (index names, paths, wheels) into the environment kiapi runs in."""
    if backend is not None and not sys.platform.startswith("linux"):
        raise click.ClickException("--mlx picks a Linux backend; macOS always uses Metal")
    chosen = backend or default_backend()
    names = install_plugins(
        list(targets), chosen, choose_installer(installer), upgrade=upgrade, editable=editable
    )
    click.echo(f"installed: {', '.join(names)} (restart `kiapi serve` to load them)")


@click.command()
@click.argument("names", nargs=-1, required=True)
@INSTALLER_OPTION
def uninstall(names: tuple[str, ...], installer: str) -> None:
    """Uninstall plugins from the environment kiapi runs in (their dependencies stay)."""
    host = _canonical(DISTRIBUTION)
    if any(_canonical(n) == host for n in names):
        raise click.ClickException(f"{DISTRIBUTION} is kiapi itself; uninstall it with pip or uv")
    installed = _installed()
    present = [n for n in names if _canonical(n) in installed]
    for name in names:
        if name not in present:
            click.echo(f"{name} is not installed", err=True)
    if present:
        choose_installer(installer).run("uninstall", *present)
