"""Naming a plugin registered in code so another process (the worker) can load it too.

A plugin object handed to ``create_app(extra_plugins=...)`` lives in the server process; jobs
run in the worker process, which imports plugins itself. A module, a module-level class or an
instance of one whose constructor needs no arguments can be named (``module:Qualname()``) and
rebuilt there; anything else (a closure, an instance with state) cannot.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PluginRef:
    name: str  # the plugin's name in the registry
    target: str  # "module", "module:Qualname" or "module:Qualname()"
    path: str | None  # the sys.path entry the module was found under

    def as_list(self) -> list[str | None]:
        return [self.name, self.target, self.path]


def _root(module: types.ModuleType) -> str | None:
    """The sys.path entry ``module`` was imported from (so the worker can import it too)."""
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    depth = module.__name__.count(".") + (1 if path.name == "__init__.py" else 0)
    return str(path.parents[depth])


def reference(name: str, obj: object) -> tuple[PluginRef | None, str]:
    """How another process can rebuild ``obj``, or None and why it cannot."""
    if isinstance(obj, types.ModuleType):
        return PluginRef(name, obj.__name__, _root(obj)), ""
    cls = obj if inspect.isclass(obj) else type(obj)
    if "<locals>" in cls.__qualname__:
        return None, f"its class {cls.__qualname__} is defined inside a function"
    module = sys.modules.get(cls.__module__)
    if module is None:
        return None, f"its module {cls.__module__} is not importable"
    if obj is cls:
        return PluginRef(name, f"{cls.__module__}:{cls.__qualname__}", _root(module)), ""
    try:
        inspect.signature(cls).bind()
    except (TypeError, ValueError):
        return None, f"{cls.__qualname__}() needs arguments, so the worker cannot rebuild it"
    return PluginRef(name, f"{cls.__module__}:{cls.__qualname__}()", _root(module)), ""


def resolve(ref: PluginRef) -> object:
    """The plugin object ``ref`` names, imported in this process."""
    if ref.path and ref.path not in sys.path:
        sys.path.append(ref.path)
    module_name, _, attr = ref.target.partition(":")
    obj: object = importlib.import_module(module_name)
    if not attr:
        return obj
    call = attr.endswith("()")
    for part in attr.removesuffix("()").split("."):
        obj = getattr(obj, part)
    return obj() if call else obj  # type: ignore[operator]
