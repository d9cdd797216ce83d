"""The README's two commands are the ones CI and users run."""

from __future__ import annotations

import re

from helpers import ROOT


def _commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"^(pip install uv && .+)$", readme, re.M)


def test_readme_has_the_install_serve_and_install_test_commands() -> None:
    commands = _commands()
    assert any(c.endswith("uv run kiapi serve") for c in commands), commands
    assert any(c.endswith("uv run pytest") for c in commands), commands


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_command = next(c for c in _commands() if c.endswith("uv run pytest"))
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci
