"""Who owns which request paths and model names, and the rules a plugin's contribution obeys.

A third-party plugin serves only under ``/v1/{domain}/{name}/`` of a capability it registers;
the host's default plugins own their paths and everything under them (``/v1/jobs/...``,
``/v1/files/...``, ``/playground/...``), and each capability's ``openapi.json``. No route may
answer a request path that another plugin's route, prefix or space could answer (compared by
structure, path parameters and converters included: ``web/route_paths.py``). A fragment
documents exactly the plugin's routes and methods. Every model name, alias and family names
one thing across all plugins. Each violation is a message naming the rule and the other party;
the loader refuses the whole plugin on any.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from starlette.routing import BaseRoute, Mount, Route, Router, WebSocketRoute

from kiapi_core.capabilities import Capability
from kiapi_core.models.spec import ModelSpec
from kiapi_core.web.openapi import HTTP_METHODS
from kiapi_core.web.route_paths import (
    Template,
    methods_of,
    openapi_path,
    overlap,
    parse,
    route_template,
)

# The host serves each capability's document; named as its owner in messages.
DOCUMENT_OWNER = "kiapi.meta"


@dataclass(frozen=True)
class Claim:
    """Request paths one plugin answers. ``kind``: route | space (everything under a default
    plugin's path) | prefix (a capability's) | document (a capability's openapi.json)."""

    template: Template
    owner: str
    kind: str
    what: str


def claims_of(
    name: str, builtin: bool, routes: Iterable[BaseRoute], capabilities: Iterable[Capability]
) -> list[Claim]:
    out: list[Claim] = []
    for route in routes:
        template = route_template(route)
        out.append(Claim(template, name, "route", f"route {_shown(route)}"))
        if builtin:
            head = _literal_head(template)
            space = Claim(parse(head, below=True), name, "space", f"the paths under {head}/")
            if space not in out:
                out.append(space)
    for cap in capabilities:
        out.append(
            Claim(
                parse(cap.prefix, below=True),
                name,
                "prefix",
                f"the prefix {cap.prefix}/ of capability {cap.name!r}",
            )
        )
        out.append(
            Claim(
                parse(f"{cap.prefix}/openapi.json"),
                DOCUMENT_OWNER,
                "document",
                f"route GET {cap.prefix}/openapi.json (capability {cap.name!r}'s document,"
                " served by the host)",
            )
        )
    return out


def _shown(route: BaseRoute) -> str:
    return f"{methods_of(route)} {route_template(route).shown}"


def _literal_head(template: Template) -> str:
    """The path up to its first parameter: ``/v1/jobs/{job_id}/events`` -> ``/v1/jobs``."""
    head = []
    for segment in template.segments:
        if not isinstance(segment, str):
            break
        head.append(segment)
    return "/" + "/".join(head)


def route_problems(
    name: str,
    builtin: bool,
    routes: list[BaseRoute],
    capabilities: list[Capability],
    taken: list[Claim],
) -> list[str]:
    """Routes outside the plugin's prefixes, and routes or prefixes overlapping another's."""
    problems = []
    own = claims_of(name, builtin, routes, capabilities)
    documents = [c for c in own if c.kind == "document"]
    for mine in own:
        if mine.owner != name or mine.kind == "space":
            continue
        others = [c for c in taken if c.owner != name and c.kind != "document"]
        if mine.kind == "route":
            # Each capability's document; another plugin's lies inside its prefix anyway.
            others += documents
        hits: dict[str, list[Claim]] = {}
        for other in others:
            if builtin and other.kind == "space":
                continue  # the default plugins' own routes are checked route by route
            if overlap(mine.template, other.template):
                hits.setdefault(other.owner, []).append(other)
        for owner, claims in hits.items():
            # The most specific first: a route, then a prefix, then a space.
            claims.sort(key=lambda c: ("route", "document", "prefix", "space").index(c.kind))
            more = len({c.what for c in claims}) - 1
            also = f" (and {more} more of its paths)" if more else ""
            problems.append(
                f"{mine.what} overlaps {claims[0].what} of plugin {owner!r}{also}: some request"
                " path would match both"
            )
    # After the overlaps, which name the other party (the first error is what strict mode shows).
    prefixes = [f"{cap.prefix}/" for cap in capabilities]
    if not builtin:
        for route in routes:
            path = route_template(route).shown
            if not any(path.startswith(prefix) for prefix in prefixes):
                where = ", ".join(prefixes) if prefixes else "none: it registers no capability"
                problems.append(
                    f"route {_shown(route)} lies outside its capabilities' prefixes ({where}):"
                    " a plugin serves only under /v1/{domain}/{name}/ of a capability it"
                    " registers"
                )
    return problems


def _served(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, set[str]]]:
    """(OpenAPI path, methods) of every HTTP route; ``(mount path, {"*"})`` for a Mount whose
    app cannot be listed (its paths are then documented as the plugin sees fit)."""
    for route in routes:
        if isinstance(route, Route):
            methods = {m.lower() for m in route.methods or {"GET"}}
            if "get" in methods:
                methods.discard("head")  # Starlette adds HEAD to every GET route
            yield openapi_path(prefix + route.path), methods
        elif isinstance(route, Mount):
            if isinstance(route.app, Router):
                yield from _served(route.routes, prefix + route.path)
            else:
                yield openapi_path(prefix + route.path), {"*"}
        elif not isinstance(route, WebSocketRoute):  # OpenAPI has no WebSocket operations
            yield getattr(route, "path", repr(route)), {"*"}


def documentation_problems(routes: list[BaseRoute], fragment: dict[str, Any]) -> list[str]:
    """Where the fragment and the routes disagree: a documented path or method no route
    serves, or a route (method) without its path item (operation)."""
    served: dict[str, set[str]] = {}
    opaque: list[str] = []
    for path, methods in _served(routes):
        if "*" in methods:
            opaque.append(path.rstrip("/") + "/")
        else:
            served.setdefault(path, set()).update(methods)
    documented = {
        path: {m for m in HTTP_METHODS if m in (item or {})}
        for path, item in (fragment.get("paths") or {}).items()
    }
    problems = []
    for path, methods in documented.items():
        if any(path.startswith(o) for o in opaque):
            continue
        if path not in served:
            problems.append(
                f"its OpenAPI fragment documents {path}, which none of its routes serves"
            )
            continue
        for method in sorted(methods - served[path]):
            problems.append(
                f"its OpenAPI fragment documents {method.upper()} {path}, which its routes do"
                f" not serve (they serve {', '.join(sorted(m.upper() for m in served[path]))})"
            )
    for path, methods in served.items():
        if path not in documented:
            shown = ", ".join(sorted(m.upper() for m in methods))
            problems.append(f"route {shown} {path} has no path item in its OpenAPI fragment")
            continue
        for method in sorted(methods - documented[path]):
            problems.append(
                f"route {method.upper()} {path} is not documented: the path item {path} of its"
                f" OpenAPI fragment has no {method!r} operation"
            )
    return problems


def selectors_of(models: Iterable[ModelSpec]) -> tuple[dict[str, str], list[str]]:
    """What each lowercase name, alias and family selects (a model key, or a family's default),
    and the names that select two different things within these models."""
    chosen: dict[str, str] = {}
    problems = []
    specs = list(models)
    families = {s.family.lower() for s in specs}
    for spec in specs:
        for selector in spec.names():
            key = selector.lower()
            target = f"model {spec.key}"
            if key in families and key != spec.family.lower():
                problems.append(
                    f"model name or alias {key!r} of {spec.key} is also the name of family {key!r}"
                )
            if chosen.get(key, target) != target:
                problems.append(
                    f"model name or alias {key!r} names both {chosen[key]} and {target}"
                )
            chosen.setdefault(key, target)
    for family in families:
        chosen.setdefault(family, f"family {family!r}")
    return chosen, problems


def model_problems(
    name: str, models: list[ModelSpec], taken: dict[str, tuple[str, str]]
) -> list[str]:
    """Model names, aliases and families that would select something of another plugin too.

    ``taken``: lowercase selector -> (plugin, what it selects)."""
    chosen, problems = selectors_of(models)
    for selector, target in chosen.items():
        owner, other = taken.get(selector, (name, ""))
        if owner != name:
            problems.append(
                f"model name, alias or family {selector!r} (its {target}) already selects {other}"
                f" of plugin {owner!r}: every name resolves to one model across all plugins"
            )
    return problems
