"""The README's two commands are the ones CI and users run."""

from __future__ import annotations

import re

from helpers import ROOT

# A fresh Debian/Ubuntu has python3 and its venv module, maybe nothing else (PEP 668 forbids
# installing into the system Python): so the commands start there.
START = "python3 -m venv .venv && "


def _commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(rf"^({re.escape(START)}.+)$", readme, re.M)


def install_step() -> str:
    """What both commands do before they serve or test (tests/test_install.py reruns it)."""
    serve = next(c for c in _commands() if c.endswith(" && .venv/bin/kiapi serve"))
    return serve.removesuffix(" && .venv/bin/kiapi serve")


def test_readme_has_the_install_serve_and_install_test_commands() -> None:
    commands = _commands()
    assert any(c.endswith(" && .venv/bin/kiapi serve") for c in commands), commands
    assert any(c.endswith(" && .venv/bin/pytest") for c in commands), commands


def test_both_commands_install_the_same_way() -> None:
    step = install_step()
    assert f"{step} && .venv/bin/pytest" in _commands()
    # Nothing but python3 from PATH: pip and uv are the ones in .venv.
    programs = [part.split()[0] for part in step.split(" && ")]
    assert programs[0] == "python3" and all(p.startswith(".venv/bin/") for p in programs[1:])
    # The sync keeps what it did not install: uv itself, pip, plugins added by `kiapi install`.
    assert "--inexact" in step


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_command = next(c for c in _commands() if c.endswith(".venv/bin/pytest"))
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci
