"""Which local folder holds each model's weights: ``$KIAPI_HOME/weights.json``.

Requests only ever read this registry; downloading happens in ``kiapi activate``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from kiapi_core.models.spec import ModelSpec


class WeightsRegistry:
    def __init__(self, home: Path) -> None:
        self.path = home / "weights.json"

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, data: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".weights-", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def entry(self, spec: ModelSpec) -> dict[str, Any] | None:
        return self._read().get(spec.key)

    def path_for(self, spec: ModelSpec) -> Path | None:
        """The activated folder, or None when not activated or gone from disk."""
        entry = self.entry(spec)
        if not entry:
            return None
        path = Path(entry["path"])
        return path if path.is_dir() else None

    def activate(self, spec: ModelSpec, path: Path, source: str) -> None:
        data = self._read()
        data[spec.key] = {
            "path": str(path.resolve()),
            "source": source,
            "activated_at": time.time(),
        }
        self._write(data)

    def deactivate(self, spec: ModelSpec) -> bool:
        data = self._read()
        found = data.pop(spec.key, None) is not None
        if found:
            self._write(data)
        return found


def activation_command(spec: ModelSpec) -> str:
    """The command that activates ``spec``'s weights (``kiapi activate FAMILY``)."""
    return f"kiapi activate {spec.family}"


def missing_weights(registry: WeightsRegistry, spec: ModelSpec) -> str | None:
    """Why a request cannot use ``spec`` now, naming the command that fixes it; None if it can."""
    if spec.weights is None or registry.path_for(spec) is not None:
        return None
    command = activation_command(spec)
    return (
        f"the {spec.key} weights are not activated on this server; run: {command}"
        f" (or `{command} --path DIR` for weights already on disk), then retry"
    )
