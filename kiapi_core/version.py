"""The host's own version, as installed (the distribution's metadata)."""

from __future__ import annotations

from functools import cache
from importlib import metadata

# Not `kiapi`: that name on the package index belongs to another project.
DISTRIBUTION = "kiapi-core"


@cache
def host_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"
