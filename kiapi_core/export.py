"""Write the committed contracts in ``schemas/`` from the pydantic models (via the live app).

    uv run python -m kiapi_core.export [--check] [--out schemas]

``--check`` exits 1 and names every file whose committed copy is stale (CI runs it in the
test suite). Only the host and the plugins named in ``EXPORTED_PLUGINS`` are exported, with
default settings, so the output does not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

EXPORTED_PLUGINS = ["ideogram4"]


def documents() -> dict[str, dict[str, Any]]:
    """File name → document, as a default `kiapi serve` with the exported plugins serves them."""
    from kiapi_core.app import create_app
    from kiapi_core.settings import Settings
    from kiapi_core.web.openapi import capability_document

    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), plugins=EXPORTED_PLUGINS, api_key=None)
        app = create_app(settings)
        state = app.state.kiapi
        doc = state.openapi()
        out = {"openapi.json": doc}
        for cap in state.registry.capabilities.values():
            out[f"{cap.name}.openapi.json"] = capability_document(doc, cap)
        state.db.close()
    return out


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export (or check) the committed OpenAPI schemas.")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "schemas"
    )
    parser.add_argument("--check", action="store_true", help="Fail if a committed file is stale.")
    args = parser.parse_args(argv)
    stale = []
    for name, doc in documents().items():
        path = args.out / name
        text = render(doc)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(
            "stale (run `uv run python -m kiapi_core.export`):\n  " + "\n  ".join(stale),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
