"""A catalog entry: what a plugin tells the host about one model it can load."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LoadOptions = Mapping[str, Any]
# Model names, aliases and families: what a request's ``model`` field holds and a URL part
# (``family/name``). Lowercase only; requests are matched case-insensitively.
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Weights:
    """Where a model's weights come from and how to check a folder of them.

    ``download(dest_root)`` fetches them (called by ``kiapi activate``, never by a request) and
    returns the folder; ``validate(folder)`` raises ``ValueError`` with a message a user can act
    on when the folder is not a usable checkpoint.
    """

    source: str
    download: Callable[[], Path]
    validate: Callable[[Path], None]


@dataclass(frozen=True)
class ModelSpec:
    """One servable model.

    ``load(weights_dir, options)`` builds the model object where jobs run (the worker process, by default) (heavy imports
    belong inside it); ``unload(obj)`` frees what garbage collection alone would not.
    ``memory_gb`` (or ``estimate_memory_gb(weights_dir, options)``) feeds the host's memory budget;
    higher ``priority`` stays resident longer when something must be evicted.
    """

    name: str
    family: str
    domain: str
    load: Callable[[Path | None, LoadOptions], Any]
    aliases: tuple[str, ...] = ()
    default: bool = False
    features: tuple[str, ...] = ()
    memory_gb: float = 0.0
    estimate_memory_gb: Callable[[Path | None, LoadOptions], float] | None = None
    priority: int = 0
    unload: Callable[[Any], None] | None = None
    weights: Weights | None = None
    description: str = ""

    def __post_init__(self) -> None:
        for what, value in (
            ("name", self.name),
            ("family", self.family),
            *(("alias", a) for a in self.aliases),
        ):
            if not isinstance(value, str) or not MODEL_NAME.match(value):
                raise ValueError(
                    f"model {what} {value!r} must match {MODEL_NAME.pattern} (lowercase letters,"
                    " digits, '.', '_' and '-'; it is a request's `model` and a URL part)"
                )

    @property
    def key(self) -> str:
        """Unique across plugins: ``family/name``."""
        return f"{self.family}/{self.name}"

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def memory_for(self, weights_dir: Path | None, options: LoadOptions) -> float:
        if self.estimate_memory_gb is not None:
            return float(self.estimate_memory_gb(weights_dir, options))
        return self.memory_gb

    def public(self) -> dict[str, Any]:
        """The CapabilityModelSpec shape served at ``/v1/{domain}/{family}/models``."""
        return {
            "name": self.name,
            "family": self.family,
            "domain": self.domain,
            "aliases": list(self.aliases),
            "default": self.default,
            "features": list(self.features),
        }


def resolve_model(specs: list[ModelSpec], requested: str | None) -> ModelSpec | None:
    """The spec named (or aliased) by ``requested``, or the default when it is None."""
    if requested is None:
        return next((s for s in specs if s.default), specs[0] if specs else None)
    wanted = requested.strip().lower()
    return next((s for s in specs if wanted in (n.lower() for n in s.names())), None)


def describe_choices(specs: list[ModelSpec]) -> list[dict[str, Any]]:
    """``[{name, aliases, default}]`` per spec: what an "unknown model" error lists as valid."""
    return [{"name": s.name, "aliases": list(s.aliases), "default": s.default} for s in specs]


def require_model(specs: list[ModelSpec], requested: str | None, capability: str) -> ModelSpec:
    """``resolve_model``, or a 400 ``ApiError`` naming the valid models (and ``valid_models``,
    ``describe_choices``) for ``capability`` when nothing matches."""
    spec = resolve_model(specs, requested)
    if spec is not None:
        return spec
    from kiapi_core.web.errors import ApiError  # the web layer only when a request is refused

    names = "; ".join(
        f"{s.name} (aliases: {', '.join(s.aliases)})" if s.aliases else s.name for s in specs
    )
    raise ApiError(
        400,
        f"unknown model {requested!r} for {capability}; valid: {names or 'none'}",
        valid_models=describe_choices(specs),
    )
