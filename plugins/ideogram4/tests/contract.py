"""Structural comparison of a served OpenAPI document with a promised contract.

Everything the contract states must be served unchanged: paths, methods, status codes, media
types, headers, schema names, property names, types, enums, defaults, bounds, required lists,
additionalProperties. Wording (description, title, summary, examples) is ours to write.
Extensions may only add: new paths, methods, status codes, media types, headers, properties,
components, and content for a response that had none — never a new constraint or default on
something the contract already defines.
"""

from __future__ import annotations

from typing import Any

DOC_KEYS = frozenset({"description", "title", "summary", "examples", "example"})
# Containers whose *members* may be extended.
OPEN_CONTAINERS = frozenset(
    {"paths", "properties", "responses", "content", "headers", "schemas", "components"}
)
# Keys an extension may add to an existing object of the contract.
ADDABLE = frozenset({"content", "headers", "tags", "security"})


HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def differences(contract: Any, served: Any, path: str = "", parent: str = "") -> list[str]:
    """Where ``served`` fails to hold ``contract`` unchanged (empty when it does)."""
    out: list[str] = []
    if isinstance(contract, dict):
        if not isinstance(served, dict):
            return [f"{path or '/'}: expected an object, served {type(served).__name__}"]
        container = parent in OPEN_CONTAINERS
        # A path item ("/paths/<p>") may gain operations; any other object may not gain rules.
        path_item = (
            path.startswith("/paths/") and path.count("/paths/") == 1 and parent.startswith("/")
        )
        for key, value in contract.items():
            if not container and (key in DOC_KEYS or key.startswith("x-")):
                continue
            if key not in served:
                out.append(f"{path}/{key}: missing")
                continue
            out.extend(differences(value, served[key], f"{path}/{key}", key))
        if not container:
            for key in served:
                if key in contract or key in DOC_KEYS or key.startswith("x-") or key in ADDABLE:
                    continue
                if path_item and key in HTTP_METHODS:
                    continue
                out.append(
                    f"{path}/{key}: added {served[key]!r} (extensions may not add constraints)"
                )
        return out
    if isinstance(contract, list):
        if not isinstance(served, list) or len(served) != len(contract):
            return [f"{path}: expected {contract!r}, served {served!r}"]
        for i, (c, s) in enumerate(zip(contract, served, strict=True)):
            out.extend(differences(c, s, f"{path}[{i}]", parent))
        return out
    if contract != served or (
        type(contract) is not type(served) and isinstance(contract, bool | str)
    ):
        out.append(f"{path}: expected {contract!r}, served {served!r}")
    return out


def contract_differences(contract: dict[str, Any], served: dict[str, Any]) -> list[str]:
    """Differences over the parts that make the API: paths and components."""
    out = []
    if served.get("openapi") != contract.get("openapi"):
        out.append(
            f"/openapi: expected {contract.get('openapi')!r}, served {served.get('openapi')!r}"
        )
    out.extend(differences(contract["paths"], served.get("paths", {}), "/paths", "paths"))
    out.extend(
        differences(
            contract["components"], served.get("components", {}), "/components", "components"
        )
    )
    return out
