"""Running the ``kiapi`` CLI as a user would, offline, for the zimage tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kiapi_core.testing import kiapi_command

OFFLINE = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
PLUGIN_DIR = Path(__file__).resolve().parents[1]
# Generations stay tiny: a 64x64, 2-step image still costs seconds of CPU.
SMALL = {"width": 64, "height": 64, "steps": 2}


def kiapi(
    home: Path,
    *args: str,
    env: dict[str, str] | None = None,
    check: bool = True,
    plugins: str | None = "zimage",
) -> subprocess.CompletedProcess[str]:
    """``plugins=None`` loads every installed plugin."""
    full = {**os.environ, **OFFLINE, "KIAPI_HOME": str(home), **(env or {})}
    full.pop("KIAPI_PLUGINS", None)
    if plugins is not None:
        full["KIAPI_PLUGINS"] = plugins
    return subprocess.run(
        kiapi_command(*args),
        env=full,
        capture_output=True,
        text=True,
        check=check,
        timeout=600,
    )
