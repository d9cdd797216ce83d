"""The committed schemas/ match what the pydantic models generate today."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def test_committed_schemas_are_fresh() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "kiapi_core.export", "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr


def test_committed_capability_schema_is_self_contained() -> None:
    doc = json.loads((Path(ROOT) / "schemas" / "ideogram4.openapi.json").read_text())
    assert doc["x-kiapi-capability"] == "ideogram4"
    assert "GenerateRequest" in doc["components"]["schemas"]
