"""Running the ``kiapi`` CLI as a user would, offline, for the ideogram4 tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kiapi_core.testing import kiapi_command

OFFLINE = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def kiapi(
    home: Path, *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        kiapi_command(*args),
        env={
            **os.environ,
            **OFFLINE,
            "KIAPI_PLUGINS": "ideogram4",
            "KIAPI_HOME": str(home),
            **(env or {}),
        },
        capture_output=True,
        text=True,
        check=check,
        timeout=300,
    )
