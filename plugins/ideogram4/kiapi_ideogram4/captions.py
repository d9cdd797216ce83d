"""mflux's own caption verifier, usable in the API process without importing mlx.

``caption.py`` in mflux needs only the standard library, but importing it through its package
pulls in mlx, numpy and transformers (~2 s, hundreds of MB). Loading that one file by path
keeps the host small while checking captions with exactly mflux's rules.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

_RELATIVE = Path("models/ideogram4/model/ideogram4_text_encoder/caption.py")


@lru_cache(maxsize=1)
def _module() -> ModuleType:
    full_name = "mflux.models.ideogram4.model.ideogram4_text_encoder.caption"
    if full_name in sys.modules:  # already imported for real (a worker loaded the model)
        return sys.modules[full_name]
    spec = importlib.util.find_spec("mflux")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("mflux is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / _RELATIVE
    file_spec = importlib.util.spec_from_file_location("kiapi_ideogram4._mflux_caption", path)
    if file_spec is None or file_spec.loader is None:
        raise RuntimeError(f"cannot load mflux's caption verifier from {path}")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[file_spec.name] = module  # dataclasses look their module up while defining
    file_spec.loader.exec_module(module)
    return module


def prepare_caption(prompt: str | dict[str, Any]) -> dict[str, Any]:
    """mflux's verdict on a prompt: its caption-schema warnings (plain text always gets one)."""
    prepared = _module().Ideogram4Caption.prepare(prompt)
    return {"is_json_caption": bool(prepared.is_json_caption), "warnings": list(prepared.warnings)}
