"""Write the committed contracts in ``schemas/`` from the pydantic models (via the live app).

    python -m kiapi_core.export [--check] [--out DIR]

``--out`` defaults to the checkout's ``schemas/`` when this module runs from a source checkout;
an installed copy has no such folder (``site-packages/schemas`` is nobody's), so it needs
``--out``. ``--check`` exits 1 and names every file whose copy is stale (CI runs it in the test
suite). Only the host and the plugins named in ``EXPORTED_PLUGINS`` are exported, with default
settings, so the output does not depend on the machine.
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


def checkout_schemas(package_dir: Path | None = None) -> Path | None:
    """``schemas/`` of the source checkout this package runs from, or None when installed."""
    import tomllib

    from kiapi_core.version import DISTRIBUTION

    root = (package_dir or Path(__file__).resolve().parent).parent
    try:
        with (root / "pyproject.toml").open("rb") as fh:
            name = tomllib.load(fh).get("project", {}).get("name")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return root / "schemas" if name == DISTRIBUTION else None


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kiapi_core.export",
        description="Export (or check) the committed OpenAPI schemas.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Directory to write (default: schemas/ of the source checkout this runs from).",
    )
    parser.add_argument("--check", action="store_true", help="Fail if a committed file is stale.")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = checkout_schemas()
        if args.out is None:
            parser.error("--out DIR is required: this kiapi is installed, not a source checkout")
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
