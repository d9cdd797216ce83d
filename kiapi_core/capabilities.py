"""What a plugin serves: a named capability in a domain, owning ``/v1/{domain}/{name}/``."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Capability:
    """A capability: ``name`` in ``domain`` owns the URL prefix ``/v1/{domain}/{name}/``.

    Both are lowercase slugs (they become URL parts); ``title`` and ``description`` head the
    capability's own OpenAPI document at ``/v1/{domain}/{name}/openapi.json``.
    """

    name: str
    domain: str
    title: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        for field, value in (("name", self.name), ("domain", self.domain)):
            if not _SLUG.match(value):
                raise ValueError(
                    f"capability {field} {value!r} must match {_SLUG.pattern}"
                    " (it becomes a URL part)"
                )

    @property
    def prefix(self) -> str:
        return f"/v1/{self.domain}/{self.name}"
