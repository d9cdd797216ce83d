"""Merging plugin OpenAPI fragments into one document, and cutting per-capability documents.

A fragment is ``{"paths": {...}, "components": {"schemas": {...}, ...}}``. Fragments are
checked with jsonschema when loaded; a component defined identically by two plugins is shared,
a differing one is a collision that refuses the later plugin.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from kiapi_core.capabilities import Capability

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

_OPERATION = {
    "type": "object",
    "required": ["responses"],
    "properties": {
        "summary": {"type": "string"},
        "description": {"type": "string"},
        "operationId": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "parameters": {
            "type": "array",
            "items": {
                "type": "object",
                "anyOf": [
                    {"required": ["$ref"]},
                    {
                        "required": ["name", "in"],
                        "properties": {
                            "name": {"type": "string"},
                            "in": {"enum": ["query", "header", "path", "cookie"]},
                        },
                    },
                ],
            },
        },
        "requestBody": {"type": "object"},
        "responses": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"pattern": "^([1-5][0-9X]{2}|default)$"},
            "additionalProperties": {"type": "object"},
        },
    },
}

FRAGMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "paths": {
            "type": "object",
            "propertyNames": {"pattern": "^/"},
            "additionalProperties": {
                "type": "object",
                "propertyNames": {
                    "pattern": "^(get|put|post|delete|options|head|patch|trace"
                    "|parameters|summary|description|x-.*)$"
                },
                "properties": {m: _OPERATION for m in HTTP_METHODS},
            },
        },
        "components": {
            "type": "object",
            "propertyNames": {
                "enum": [
                    "schemas",
                    "responses",
                    "parameters",
                    "examples",
                    "requestBodies",
                    "headers",
                    "securitySchemes",
                ]
            },
            "additionalProperties": {
                "type": "object",
                "propertyNames": {"pattern": "^[A-Za-z0-9._-]+$"},
                "additionalProperties": {"type": "object"},
            },
        },
        "tags": {"type": "array"},
    },
}


# Where generated fragments and validity checks are cached: the server's home while its
# plugins load (``cache_under``), else the user's cache directory (e.g. ``kiapi_core.export``).
_CACHE_DIR: ContextVar[Path | None] = ContextVar("kiapi_openapi_cache", default=None)
_LISTED: ContextVar[dict[str, list[list[object]]] | None] = ContextVar(
    "kiapi_openapi_sources", default=None
)


@contextmanager
def cache_under(directory: Path) -> Iterator[None]:
    """Cache OpenAPI work under ``directory`` (the server's ``$KIAPI_HOME/cache``) meanwhile.

    Meanwhile a package's sources are listed once, however many fragments depend on them
    (``kiapi_core``'s ~200 files were walked for each of its fragments).
    """
    token = _CACHE_DIR.set(directory)
    listed = _LISTED.set({})
    try:
        yield
    finally:
        _LISTED.reset(listed)
        _CACHE_DIR.reset(token)


def _cache_dir() -> Path:
    chosen = _CACHE_DIR.get()
    if chosen is not None:
        return chosen
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kiapi"


def _cache_path() -> Path:
    return _cache_dir() / "openapi-fragments-valid.json"


def _write_cache(path: Path, text: str) -> None:
    """Atomically, or not at all: failing to write a cache costs only the next start's time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError:
        pass


_valid_digests: set[str] | None = None
_cache_lock = threading.Lock()


def _digest(fragment: Any) -> str | None:
    try:
        text = json.dumps([FRAGMENT_SCHEMA, fragment], sort_keys=True, default=str)
    except (TypeError, ValueError, RecursionError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _known_valid() -> set[str]:
    global _valid_digests
    if _valid_digests is None:
        try:
            _valid_digests = set(json.loads(_cache_path().read_text()))
        except (OSError, ValueError, TypeError):
            _valid_digests = set()
    return _valid_digests


def _remember_valid(digest: str) -> None:
    known = _known_valid()
    known.add(digest)
    _write_cache(_cache_path(), json.dumps(sorted(known)[-256:]))


def validate_fragment(fragment: Any) -> list[str]:
    """Problems with a fragment's shape, as readable messages (empty when fine).

    Validation proper uses jsonschema; a fragment byte-identical to one already found valid
    (same schema too) is recognised by its digest, so a restart skips importing jsonschema,
    which is a large share of the host's start-up time.
    """
    digest = _digest(fragment)
    with _cache_lock:
        if digest is not None and digest in _known_valid():
            return []
    import jsonschema

    validator = jsonschema.Draft202012Validator(FRAGMENT_SCHEMA)
    errors = []
    for err in sorted(validator.iter_errors(fragment), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        errors.append(f"openapi fragment invalid at {where}: {err.message}")
    if not errors and digest is not None:
        with _cache_lock:
            _remember_valid(digest)
    return errors


def _documents_cache_path() -> Path:
    return _cache_dir() / "openapi-documents-valid.json"


_valid_documents: set[str] | None = None


@cache
def _validator_version() -> str:
    from importlib.metadata import version

    return version("openapi-spec-validator")


def document_digest(doc: dict[str, Any]) -> str | None:
    """What identifies a document in the cache of valid ones (None: not JSON)."""
    try:
        text = json.dumps([_validator_version(), doc], sort_keys=True, default=str)
    except (TypeError, ValueError, RecursionError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def validate_document(doc: dict[str, Any], digest: str | None = None) -> list[str]:
    """Problems openapi-spec-validator finds in a whole OpenAPI 3.1 document (empty when valid).

    Like fragments, a document byte-identical to one found valid before is recognised by its
    digest (kept in the user's cache), so a restart with unchanged plugins imports no
    validator; the validator's version is part of the digest. ``digest`` is the document's
    when the caller has one (``OpenAPIMerge.preview_digest``), else it is computed.
    """
    global _valid_documents
    if digest is None:
        digest = document_digest(doc)
    with _cache_lock:
        if _valid_documents is None:
            try:
                _valid_documents = set(json.loads(_documents_cache_path().read_text()))
            except (OSError, ValueError, TypeError):
                _valid_documents = set()
        if digest is not None and digest in _valid_documents:
            return []
    from openapi_spec_validator import OpenAPIV31SpecValidator

    errors = []
    for err in OpenAPIV31SpecValidator(doc).iter_errors():
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        if err.absolute_path and err.absolute_path[0] not in doc:
            where = f"{where} of one of its schemas"  # schemas are checked on their own
        message = err.message.split("\n", 1)[0]
        errors.append(f"the merged OpenAPI document would be invalid at {where}: {message}")
        if len(errors) == 5:
            break
    if not errors and digest is not None:
        with _cache_lock:
            _valid_documents.add(digest)
            _write_cache(_documents_cache_path(), json.dumps(sorted(_valid_documents)[-256:]))
    return errors


def _sources_key(packages: Iterable[str]) -> list[list[object]]:
    """Path, size and mtime of every file of these packages (or single-file modules), found
    without importing them."""
    listed = _LISTED.get()
    out: list[list[object]] = []
    for package in packages:
        if listed is not None and package in listed:
            out += listed[package]
            continue
        files = _package_files(package)
        if listed is not None:
            listed[package] = files
        out += files
    return out


def _package_files(package: str) -> list[list[object]]:
    out: list[list[object]] = []
    spec = find_spec(package)
    if spec is not None and not spec.submodule_search_locations and spec.has_location:
        # A single-file module (e.g. a one-file plugin): its own file is the source.
        stat = os.stat(str(spec.origin))
        out.append([str(spec.origin), stat.st_size, stat.st_mtime_ns])
    for root in (spec.submodule_search_locations or []) if spec else []:
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(names):
                stat = os.stat(os.path.join(folder, name))
                out.append([os.path.join(folder, name), stat.st_size, stat.st_mtime_ns])
    return out


def cached_fragment(
    name: str,
    build: Callable[[], dict[str, Any]],
    *,
    packages: Iterable[str],
    inputs: Any = None,
) -> dict[str, Any]:
    """``build()``, or the fragment it returned at an earlier start when nothing it depends on
    has changed since.

    Generating fragments from pydantic models (JSON Schema) is a noticeable share of start-up.
    The key is every source file of ``packages`` (path, size, mtime: an edit or a reinstall
    changes it), the Python, pydantic and pydantic-core versions, and ``inputs``: anything
    else the fragment shows, e.g. a configured default (JSON-able). Both paths return a fresh
    JSON copy, so a cached and a freshly built fragment are indistinguishable.
    """
    import pydantic
    import pydantic_core

    key = hashlib.sha256(
        json.dumps(
            [
                name,
                sys.version,
                pydantic.VERSION,
                pydantic_core.__version__,
                inputs,
                _sources_key(packages),
            ],
            default=str,
        ).encode()
    ).hexdigest()
    path = _cache_dir() / f"fragment-{name}.json"
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and cached.get("key") == key:
            fragment: dict[str, Any] = cached["fragment"]
            return fragment
    except (OSError, ValueError):
        pass
    built = build()
    try:
        text = json.dumps({"key": key, "fragment": built})
    except (TypeError, ValueError):
        return built  # not JSON: let validation report it, uncached
    _write_cache(path, text)
    fresh: dict[str, Any] = json.loads(text)["fragment"]
    return fresh


def iter_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from iter_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_refs(item)


def _ref_target(ref: str) -> tuple[str, str] | None:
    parts = ref.split("/")
    if len(parts) == 4 and parts[0] == "#" and parts[1] == "components":
        return parts[2], parts[3]
    return None


class OpenAPIMerge:
    """Accumulates fragments plugin by plugin, remembering who contributed what."""

    def __init__(self, title: str, version: str, description: str = "") -> None:
        self.doc: dict[str, Any] = {
            "openapi": "3.1.0",
            "info": {"title": title, "version": version, "description": description},
            "paths": {},
            "components": {"schemas": {}},
        }
        self.path_owner: dict[str, str] = {}
        self.component_owner: dict[tuple[str, str], str] = {}
        # Identifies the document so far without serializing it: the initial document's
        # digest, then each added fragment's chained to it (the merge is deterministic).
        self.digest = document_digest(self.doc)
        # The fragment last previewed and its digest: the plugin loader previews a fragment
        # (to validate it) and then adds it, and serializing it once is enough.
        self._previewed: tuple[dict[str, Any], str | None] | None = None

    def preview_digest(self, fragment: dict[str, Any]) -> str | None:
        """The digest ``preview(fragment)`` is known by in the cache of valid documents."""
        if self._previewed is not None and self._previewed[0] is fragment:
            return self._previewed[1]
        digest = None
        if self.digest is not None:
            try:
                text = json.dumps(fragment, sort_keys=True, default=str)
                digest = hashlib.sha256(f"{self.digest}+{text}".encode()).hexdigest()
            except (TypeError, ValueError, RecursionError):
                pass
        self._previewed = (fragment, digest)
        return digest

    def conflicts(self, plugin: str, fragment: dict[str, Any]) -> list[str]:
        """Collisions this fragment would cause, and references it leaves dangling."""
        problems = []
        for path in fragment.get("paths", {}):
            if path in self.path_owner:
                problems.append(
                    f"path {path} is already defined by plugin {self.path_owner[path]!r}"
                )
        for section, items in fragment.get("components", {}).items():
            for name, schema in items.items():
                owner = self.component_owner.get((section, name))
                if owner is not None and self.doc["components"][section][name] != schema:
                    problems.append(
                        f"component {section}/{name} is already defined differently"
                        f" by plugin {owner!r}"
                    )
        for ref in set(iter_refs(fragment)):
            target = _ref_target(ref)
            if target is None:
                problems.append(f"unsupported $ref {ref!r} (use #/components/<section>/<name>)")
                continue
            section, name = target
            if (
                name not in fragment.get("components", {}).get(section, {})
                and (
                    section,
                    name,
                )
                not in self.component_owner
            ):
                problems.append(f"$ref {ref} points at no component")
        return problems

    def preview(self, fragment: dict[str, Any]) -> dict[str, Any]:
        """The document as it would be with ``fragment`` added (shallow: share, don't edit)."""
        doc = dict(self.doc)
        doc["paths"] = {**self.doc["paths"], **fragment.get("paths", {})}
        components = {k: dict(v) for k, v in self.doc["components"].items()}
        for section, items in fragment.get("components", {}).items():
            target = components.setdefault(section, {})
            for name, schema in items.items():
                target.setdefault(name, schema)
        doc["components"] = components
        if fragment.get("tags"):
            doc["tags"] = [*self.doc.get("tags", []), *fragment["tags"]]
        return doc

    def add(self, plugin: str, fragment: dict[str, Any]) -> None:
        self.digest = self.preview_digest(fragment)
        self._previewed = None  # a digest of the document as it was
        # A copy: the plugin may keep (and later change) the dicts it returned.
        fragment = json_copy(fragment)
        for path, item in fragment.get("paths", {}).items():
            self.doc["paths"][path] = item
            self.path_owner[path] = plugin
        for section, items in fragment.get("components", {}).items():
            target = self.doc["components"].setdefault(section, {})
            for name, schema in items.items():
                if (section, name) not in self.component_owner:
                    target[name] = schema
                    self.component_owner[(section, name)] = plugin
        for tag in fragment.get("tags", []):
            self.doc.setdefault("tags", []).append(tag)


def json_copy(value: Any) -> Any:
    """A deep copy of JSON data (dicts, lists, scalars), several times faster than
    ``copy.deepcopy``, which keeps a memo of every object for the cycles JSON cannot have."""
    if isinstance(value, dict):
        return {k: json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_copy(v) for v in value]
    return value


def _component_closure(doc: dict[str, Any], roots: Any) -> dict[str, dict[str, Any]]:
    """Every component reachable by $ref from ``roots``, by section."""
    out: dict[str, dict[str, Any]] = {}
    pending = list(iter_refs(roots))
    while pending:
        target = _ref_target(pending.pop())
        if target is None:
            continue
        section, name = target
        if name in out.get(section, {}):
            continue
        schema = doc.get("components", {}).get(section, {}).get(name)
        if schema is None:
            continue
        out.setdefault(section, {})[name] = schema
        pending.extend(iter_refs(schema))
    return out


def capability_document(doc: dict[str, Any], capability: Capability) -> dict[str, Any]:
    """The part of the merged document under the capability's prefix, self-contained."""
    prefix = capability.prefix + "/"
    paths = {p: item for p, item in doc["paths"].items() if p.startswith(prefix)}
    components = _component_closure(doc, paths)
    components.setdefault("schemas", {})
    if "securitySchemes" in doc.get("components", {}):
        components["securitySchemes"] = doc["components"]["securitySchemes"]
    out: dict[str, Any] = {
        "openapi": doc["openapi"],
        "info": {
            "title": capability.title or f"kiapi {capability.name}",
            "version": doc["info"]["version"],
            "description": capability.description,
        },
        "paths": paths,
        "components": components,
        "x-kiapi-capability": capability.name,
        "x-kiapi-domain": capability.domain,
        "x-kiapi-root-openapi": "/openapi.json",
    }
    if "security" in doc:
        out["security"] = doc["security"]
    return out


def json_response(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """An OpenAPI response object with a JSON body (for host and plugin fragments)."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def error_response(description: str) -> dict[str, Any]:
    """A documented error response carrying the shared ``Error`` body ``{"detail": ...}``."""
    return json_response({"$ref": "#/components/schemas/Error"}, description)


# -- building path items by hand (the host's own routes) -----------------------------------
def operation(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An operation object: ``tag`` (default ``host``) becomes its one tag."""
    return {"summary": summary, "tags": [extra.pop("tag", "host")], "responses": responses, **extra}


def path_param(name: str, pattern: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": f"Looks like `{pattern}`.",
    }


def query_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


PAGING_PARAMS = [
    query_param(
        "limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}, "Page size."
    ),
    query_param(
        "cursor",
        {"type": "string", "pattern": "^[0-9]{1,18}$"},
        "`next_cursor` of the previous page.",
    ),
]
NOT_FOUND = error_response("No such id (ids are checked by pattern before any lookup).")
INVALID = error_response(
    "A parameter failed validation; `detail` lists each field, rule and message."
)
