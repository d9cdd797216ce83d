"""Finding, loading and checking plugins.

Each entry point of the group ``kiapi`` is loaded on its own, inside its own error handling
(pluggy's ``load_setuptools_entrypoints`` would let one broken plugin abort start-up). Each
hook is then called per plugin, and a plugin's contributions are accepted together or refused
together, so a failing or colliding plugin leaves no half-registered state behind.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy
from starlette.routing import BaseRoute, Mount

from kiapi_core import hookspecs
from kiapi_core.capabilities import Capability
from kiapi_core.health import HealthCheck
from kiapi_core.images.generator import ImageGenerator
from kiapi_core.jobs.context import JobHandler
from kiapi_core.models.spec import ModelSpec
from kiapi_core.operations import Operation, contribute
from kiapi_core.ownership import (
    Claim,
    claims_of,
    documentation_problems,
    model_problems,
    route_problems,
    selectors_of,
)
from kiapi_core.settings import Settings
from kiapi_core.version import DISTRIBUTION, host_version
from kiapi_core.web.openapi import (
    OpenAPIMerge,
    cache_under,
    validate_document,
    validate_fragment,
)

log = logging.getLogger("kiapi.plugins")

ENTRY_POINT_GROUP = "kiapi"
# The host's own features are plugins too, each under its own name (datasette's
# DEFAULT_PLUGINS): their routes and OpenAPI arrive through the same hooks as any plugin's and
# are collision-checked like everyone else's. In this order, the merged document's.
DEFAULT_PLUGINS = {
    "kiapi.meta": "kiapi_core.meta.plugin",
    "kiapi.jobs": "kiapi_core.jobs.plugin",
    "kiapi.files": "kiapi_core.files.plugin",
    "kiapi.images": "kiapi_core.images.plugin",
    "kiapi.playground": "kiapi_core.playground.plugin",
}
HOOK_NAMES = tuple(
    name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "kiapi_spec")
)
# The host's own subcommands (kiapi_core/cli): a plugin command of the same name is refused.
HOST_COMMANDS = frozenset(
    {
        "serve",
        "worker",
        "plugins",
        "config",
        "activate",
        "install",
        "uninstall",
        "deactivate",
        "status",
        "generate",
        "jobs",
        "files",
        "webhooks",
    }
)


class PluginError(RuntimeError):
    """Raised instead of reporting when KIAPI_STRICT_PLUGINS=1."""


class HookFailed(Exception):
    """One plugin's hook raised; the message names the hook so the author knows where to look."""

    def __init__(self, hook: str, exc: Exception) -> None:
        super().__init__(f"{hook} raised {type(exc).__name__}: {exc}")


@dataclass
class PluginInfo:
    name: str
    module: str
    version: str | None = None
    distribution: str | None = None
    builtin: bool = False
    status: str = "loaded"  # loaded | failed | disabled
    hooks: list[str] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    job_types: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # One per failure that came with an exception: shown by `kiapi plugins --traceback`.
    tracebacks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "version": self.version,
            "distribution": self.distribution,
            "builtin": self.builtin,
            "status": self.status,
            "hooks": self.hooks,
            "capabilities": self.capabilities,
            "models": self.models,
            "job_types": self.job_types,
            "paths": self.paths,
            "commands": self.commands,
            "errors": self.errors,
        }


@dataclass
class Contribution:
    capabilities: list[Capability] = field(default_factory=list)
    routes: list[BaseRoute] = field(default_factory=list)
    models: list[ModelSpec] = field(default_factory=list)
    openapi: dict[str, Any] = field(default_factory=dict)
    handlers: dict[str, JobHandler] = field(default_factory=dict)
    image_generators: list[ImageGenerator] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class Registry:
    """Everything the loaded plugins contribute, with the owner of each piece."""

    settings: Settings
    pm: pluggy.PluginManager
    plugins: dict[str, PluginInfo]
    capabilities: dict[str, Capability] = field(default_factory=dict)
    routes: list[BaseRoute] = field(default_factory=list)
    models: list[ModelSpec] = field(default_factory=list)
    handlers: dict[str, JobHandler] = field(default_factory=dict)
    # By model family, in plugin order: the first one's default model is the images default.
    image_generators: dict[str, ImageGenerator] = field(default_factory=dict)
    openapi: OpenAPIMerge = field(default_factory=lambda: OpenAPIMerge("kiapi", "0"))
    routes_of: dict[str, list[BaseRoute]] = field(default_factory=dict)
    owner: dict[tuple[str, str], str] = field(default_factory=dict)
    # The request paths each plugin answers (routes, prefixes, the host's spaces).
    claims: list[Claim] = field(default_factory=list)
    # Every lowercase model name, alias and family: (plugin, what it selects).
    model_selectors: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Each plugin's CLI subcommands (click commands), added by ``plugin_commands``.
    commands: dict[str, list[Any]] = field(default_factory=dict)
    checks: dict[str, list[HealthCheck]] = field(default_factory=dict)

    def models_for(self, family: str) -> list[ModelSpec]:
        return [m for m in self.models if m.family == family]

    def plugin_of_job_type(self) -> dict[str, str]:
        """Each job type's plugin."""
        return {t: self.owner[("job type", t)] for t in self.handlers}

    def withdraw(self, name: str) -> list[BaseRoute]:
        """Take back what plugin ``name`` contributed that serves requests or runs jobs (its
        routes, job handlers, image generators), as if it had been refused at load; its routes,
        for the app to unmount."""
        routes = self.routes_of.pop(name, [])
        self.routes = [r for r in self.routes if r not in routes]
        for job_type in [t for t in self.handlers if self.owner.get(("job type", t)) == name]:
            del self.handlers[job_type]
        for family in [
            f for f in self.image_generators if self.owner.get(("image generator", f)) == name
        ]:
            del self.image_generators[family]
        return routes

    def errors(self) -> dict[str, list[str]]:
        return {n: i.errors for n, i in self.plugins.items() if i.status == "failed"}


def new_plugin_manager(trace: bool = False) -> pluggy.PluginManager:
    """A manager knowing kiapi's hooks; ``trace`` logs every hook call (KIAPI_TRACE_PLUGINS)."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    if trace:
        pm.trace.root.setwriter(lambda message: log.info("hook: %s", message.rstrip()))
        pm.enable_tracing()
    return pm


def _fail(info: PluginInfo, message: str, settings: Settings) -> None:
    info.status = "failed"
    info.errors.append(message)
    log.error("plugin %s: %s", info.name, message)
    if settings.strict_plugins:
        raise PluginError(f"plugin {info.name!r}: {message}")


def _selected(name: str, dist: str | None, settings: Settings) -> str | None:
    """Why a plugin is not loaded, or None when it should be."""
    names = {name, dist} - {None}
    if names & set(settings.disable_plugins):
        return "disabled by KIAPI_DISABLE_PLUGINS"
    if settings.plugins is not None and not names & set(settings.plugins):
        return "not listed in KIAPI_PLUGINS"
    return None


# Each plugin's hooks are called on their own (so one plugin's failure is its own); options
# that order or wrap calls *across* plugins would silently do nothing, so they are refused.
_CROSS_PLUGIN_OPTIONS = ("hookwrapper", "wrapper", "tryfirst", "trylast")


def _register(pm: pluggy.PluginManager, obj: object, info: PluginInfo, settings: Settings) -> bool:
    try:
        pm.register(obj, name=info.name)
    except Exception as exc:  # pluggy validates hook names and argument names here
        _fail(info, f"hook validation failed: {exc}", settings)
        return False
    callers = pm.get_hookcallers(obj) or []
    problems = []
    unknown = [caller.name for caller in callers if not caller.has_spec()]
    if unknown:
        problems.append(
            f"implements unknown hook(s) {', '.join(unknown)}; known: {', '.join(HOOK_NAMES)}"
        )
    for caller in callers:
        for impl in caller.get_hookimpls():
            if impl.plugin is not obj:
                continue
            used = [opt for opt in _CROSS_PLUGIN_OPTIONS if getattr(impl, opt)]
            if used:
                problems.append(
                    f"hook {caller.name} is marked {'/'.join(used)}: kiapi calls each plugin's"
                    " hooks on their own, so ordering and wrapping other plugins' calls would"
                    " have no effect; remove the option"
                )
    if problems:
        pm.unregister(obj)
        for problem in problems:
            _fail(info, problem, settings)
        return False
    info.hooks = sorted(caller.name for caller in callers)
    return True


def load_plugins(
    settings: Settings,
    pm: pluggy.PluginManager | None = None,
    extra: Iterable[tuple[str, object]] = (),
) -> tuple[pluggy.PluginManager, dict[str, PluginInfo]]:
    """Register the host's own plugin, every selected entry point, and ``extra`` objects."""
    pm = pm or new_plugin_manager(settings.trace_plugins)
    infos: dict[str, PluginInfo] = {}
    for name, module_name in DEFAULT_PLUGINS.items():
        module = importlib.import_module(module_name)
        info = PluginInfo(
            name=name,
            module=module_name,
            version=host_version(),
            builtin=True,
            distribution=DISTRIBUTION,
        )
        infos[info.name] = info
        _register(pm, module, info, settings)

    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist else None
        info = PluginInfo(
            name=ep.name,
            module=ep.value,
            distribution=dist,
            version=ep.dist.version if ep.dist else None,
        )
        if not _claim_name(infos, info, settings):
            continue
        reason = _selected(ep.name, dist, settings)
        if reason:
            info.status = "disabled"
            info.errors = [reason]
            log.info("plugin %s %s", ep.name, reason)
            continue
        try:
            obj = ep.load()
        except BaseException as exc:  # a plugin's import may even call sys.exit
            if isinstance(exc, KeyboardInterrupt):
                raise
            info.tracebacks.append("".join(traceback.format_exception(exc)))
            _fail(info, f"import failed: {type(exc).__name__}: {exc}", settings)
            log.debug(info.tracebacks[-1])
            continue
        _register(pm, obj, info, settings)

    for name, obj in extra:
        info = PluginInfo(name=name, module=getattr(obj, "__name__", type(obj).__name__))
        if _claim_name(infos, info, settings):
            _register(pm, obj, info, settings)
    return pm, infos


def _claim_name(infos: dict[str, PluginInfo], info: PluginInfo, settings: Settings) -> bool:
    """Add ``info`` under its name, or report it (under a distinct key) when the name is taken.

    Overwriting would silently drop the first plugin; skipping silently would hide the second.
    """
    first = infos.get(info.name)
    # A disabled plugin does not hold its name: a test may register the same plugin module
    # directly (``extra_plugins``) while its installed entry point is left out.
    if first is None or first.status == "disabled":
        infos[info.name] = info
        return True
    key = f"{info.name} ({info.distribution or info.module})"
    infos[key] = info
    _fail(
        info,
        f"plugin name {info.name!r} (module {info.module}) is already taken by plugin"
        f" {first.name!r} (module {first.module}); rename one entry point",
        settings,
    )
    return False


def _call(pm: pluggy.PluginManager, hook: str, plugin: str, **kwargs: Any) -> list[Any]:
    """Call one plugin's implementations of ``hook`` through pluggy (which passes each only
    the arguments it declares, and runs hook-call monitoring such as KIAPI_TRACE_PLUGINS)."""
    own = pm.get_plugin(plugin)
    others = [p for p in pm.get_plugins() if p is not own]
    try:
        results: list[Any] = pm.subset_hook_caller(hook, remove_plugins=others)(**kwargs)
    except Exception as exc:
        raise HookFailed(hook, exc) from exc
    return results


def _gather(pm: pluggy.PluginManager, name: str, settings: Settings) -> Contribution:
    got = Contribution()

    def register_capability(capability: Capability) -> None:
        if not isinstance(capability, Capability):
            raise TypeError(f"register() expects a Capability, got {type(capability).__name__}")
        got.capabilities.append(capability)

    def register_model(spec: ModelSpec) -> None:
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"register() expects a ModelSpec, got {type(spec).__name__}")
        got.models.append(spec)

    def register_handler(job_type: str, handler: JobHandler) -> None:
        if not callable(handler):
            raise TypeError(f"handler for {job_type!r} is not callable")
        if job_type in got.handlers:
            raise ValueError(f"job type {job_type!r} registered twice")
        got.handlers[job_type] = handler

    def register_image_generator(generator: ImageGenerator) -> None:
        if not isinstance(generator, ImageGenerator):
            raise TypeError(f"register() expects an ImageGenerator, got {type(generator).__name__}")
        # A plugin answers for its own models only, so one cannot take over another's names.
        if not any(m.family == generator.family for m in got.models):
            raise ValueError(
                f"image generator for family {generator.family!r}: this plugin registers no"
                " model of that family"
            )
        if generator.job_type not in got.handlers:
            raise ValueError(
                f"image generator for family {generator.family!r}: job type"
                f" {generator.job_type!r} has no handler from this plugin"
            )
        if any(g.family == generator.family for g in got.image_generators):
            raise ValueError(f"image generator for family {generator.family!r} registered twice")
        got.image_generators.append(generator)

    def register_operation(operation: Operation[Any]) -> None:
        if not isinstance(operation, Operation):
            raise TypeError(f"register() expects an Operation, got {type(operation).__name__}")
        operations.append(operation)

    def add_fragment(fragment: dict[str, Any]) -> None:
        for key in ("paths", "components"):
            for k, v in (fragment.get(key) or {}).items():
                # Merged per method / per component, so a hand-written fragment can add to
                # (or override) what the plugin's operations generated.
                got.openapi.setdefault(key, {}).setdefault(k, {}).update(v)
        if "tags" in fragment:
            got.openapi.setdefault("tags", []).extend(fragment["tags"])

    operations: list[Operation[Any]] = []
    _call(pm, "register_capabilities", name, register=register_capability)
    _call(pm, "register_models", name, register=register_model)
    _call(pm, "register_job_handlers", name, register=register_handler)
    _call(pm, "register_operations", name, register=register_operation)
    first: dict[str, Operation[Any]] = {}  # operations may share a job type and its handler
    for op in operations:
        known = next((c for c in got.capabilities if c.name == op.capability.name), None)
        if known is None:
            got.capabilities.append(op.capability)
        elif known != op.capability:
            raise ValueError(f"operation {op.full_path}: its Capability differs from {known}")
        if first.setdefault(op.job_type, op) is op:
            register_handler(op.job_type, op.job_handler)
        elif first[op.job_type].handler is not op.handler:
            raise ValueError(f"job type {op.job_type!r}: operations give different handlers")
    if operations:
        op_routes, op_fragment = contribute(name, operations)
        got.routes.extend(op_routes)
        # Overrides the plugin gave (responses, openapi) are checked like any fragment.
        got.problems.extend(validate_fragment(op_fragment))
        add_fragment(op_fragment)
    _call(pm, "register_image_generators", name, register=register_image_generator)
    for routes in _call(pm, "register_routes", name, settings=settings):
        for route in routes or []:
            if not isinstance(route, BaseRoute):
                raise TypeError(
                    f"register_routes returned {type(route).__name__}, not a Starlette route"
                )
            got.routes.append(route)
    for fragment in _call(pm, "register_openapi", name):
        if fragment is None:
            continue
        # Checked before merging, so a malformed fragment is reported as such rather than
        # as whatever exception merging it would raise.
        shape = validate_fragment(fragment)
        if shape:
            got.problems.extend(shape)
            continue
        add_fragment(fragment)
    return got


def _route_paths(route: BaseRoute) -> list[str]:
    if isinstance(route, Mount):
        return [route.path.rstrip("/") + "/*"]
    return [getattr(route, "path", repr(route))]


def _collisions(registry: Registry, name: str, got: Contribution) -> list[str]:
    problems: list[str] = list(got.problems)
    taken = registry.owner
    builtin = registry.plugins[name].builtin

    def check(kind: str, key: str) -> None:
        owner = taken.get((kind, key))
        if owner is not None and owner != name:
            problems.append(f"{kind} {key!r} is already registered by plugin {owner!r}")

    for cap in got.capabilities:
        check("capability", cap.name)
        check("prefix", cap.prefix)
    for spec in got.models:
        check("model", f"{spec.family}/{spec.name.lower()}")
    problems.extend(model_problems(name, got.models, registry.model_selectors))
    for job_type in got.handlers:
        check("job type", job_type)
    for generator in got.image_generators:
        check("image generator", generator.family)
    problems.extend(route_problems(name, builtin, got.routes, got.capabilities, registry.claims))
    problems.extend(documentation_problems(got.routes, got.openapi))
    if not problems:
        problems.extend(registry.openapi.conflicts(name, got.openapi))
    if not problems:
        # Last, and only for an otherwise acceptable fragment: the one costly check (cached).
        merge = registry.openapi
        problems.extend(
            validate_document(merge.preview(got.openapi), merge.preview_digest(got.openapi))
        )
    return problems


def _gather_extras(pm: pluggy.PluginManager, name: str) -> tuple[list[Any], list[HealthCheck]]:
    """A plugin's CLI commands (added to a scratch group, so a raising hook leaves nothing in
    the real one) and health checks."""
    import click

    scratch = click.Group()
    _call(pm, "register_commands", name, cli=scratch)
    checks: list[HealthCheck] = []

    def register_check(check: HealthCheck) -> None:
        if not isinstance(check, HealthCheck):
            raise TypeError(f"register() expects a HealthCheck, got {type(check).__name__}")
        if any(c.name == check.name for c in checks):
            raise ValueError(f"health check {check.name!r} registered twice")
        checks.append(check)

    _call(pm, "register_health_checks", name, register=register_check)
    return list(scratch.commands.values()), checks


def _command_problems(registry: Registry, name: str, commands: list[Any]) -> list[str]:
    problems = []
    for command in commands:
        if command.name in HOST_COMMANDS:
            problems.append(f"command {command.name!r} is one of the host's own (kiapi --help)")
            continue
        owner = registry.owner.get(("command", command.name))
        if owner is not None and owner != name:
            problems.append(f"command {command.name!r} is already registered by plugin {owner!r}")
    return problems


def _accept(
    registry: Registry,
    name: str,
    got: Contribution,
    commands: list[Any] | None = None,
    checks: list[HealthCheck] | None = None,
) -> None:
    info = registry.plugins[name]
    for cap in got.capabilities:
        registry.capabilities[cap.name] = cap
        registry.owner[("capability", cap.name)] = name
        registry.owner[("prefix", cap.prefix)] = name
        info.capabilities.append(f"{cap.domain}/{cap.name}")
    for spec in got.models:
        registry.models.append(spec)
        registry.owner[("model", f"{spec.family}/{spec.name.lower()}")] = name
        info.models.append(spec.key)
    selectors, _ = selectors_of(got.models)
    for selector, target in selectors.items():
        registry.model_selectors[selector] = (name, target)
    for job_type, handler in got.handlers.items():
        registry.handlers[job_type] = handler
        registry.owner[("job type", job_type)] = name
        info.job_types.append(job_type)
    for generator in got.image_generators:
        registry.image_generators[generator.family] = generator
        registry.owner[("image generator", generator.family)] = name
    registry.routes_of[name] = list(got.routes)
    registry.routes.extend(got.routes)
    registry.claims.extend(claims_of(name, info.builtin, got.routes, got.capabilities))
    registry.openapi.add(name, got.openapi)
    info.paths = sorted({p for r in got.routes for p in _route_paths(r)})
    registry.commands[name] = list(commands or [])
    for command in registry.commands[name]:
        registry.owner[("command", command.name)] = name
    info.commands = sorted(c.name for c in registry.commands[name])
    registry.checks[name] = list(checks or [])


def build_registry(
    settings: Settings,
    pm: pluggy.PluginManager | None = None,
    extra: Iterable[tuple[str, object]] = (),
) -> Registry:
    pm, infos = load_plugins(settings, pm, extra)
    registry = Registry(settings=settings, pm=pm, plugins=infos)
    registry.openapi = OpenAPIMerge(
        "kiapi",
        host_version(),
        "A local host for AI models whose capabilities arrive as plugins. "
        "Jobs and files are shared by every capability.",
    )
    # The fragments' and the merged document's validity caches live with the server (one per
    # KIAPI_HOME), keyed by the host.
    with cache_under(settings.home / "cache"):
        for name, info in infos.items():
            if info.status != "loaded":
                continue
            try:
                got = _gather(pm, name, settings)
                commands, checks = _gather_extras(pm, name)
            except Exception as exc:
                info.tracebacks.append("".join(traceback.format_exception(exc)))
                log.debug(info.tracebacks[-1])
                message = (
                    str(exc) if isinstance(exc, HookFailed) else f"{type(exc).__name__}: {exc}"
                )
                _fail(info, message, settings)
                _unregister(pm, name)
                continue
            problems = _collisions(registry, name, got) + _command_problems(
                registry, name, commands
            )
            if problems:
                for problem in problems:
                    # Both plugins in one line: the message stands alone in logs and in /health.
                    _fail(info, f"plugin {name!r} refused: {problem}", settings)
                _unregister(pm, name)
                continue
            _accept(registry, name, got, commands, checks)
    return registry


def _unregister(pm: pluggy.PluginManager, name: str) -> None:
    plugin = pm.get_plugin(name)
    if plugin is not None:
        pm.unregister(plugin)


async def run_lifecycle(registry: Registry, hook: str, host: Any) -> list[str]:
    """Call ``startup``/``shutdown`` of every loaded plugin, each in its own error handling;
    the names of the plugins whose hook raised. A failed ``startup`` fails its plugin."""
    failed = []
    for name, info in registry.plugins.items():
        if info.status != "loaded":
            continue
        try:
            for result in _call(registry.pm, hook, name, host=host):
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:
            failed.append(name)
            if isinstance(exc, HookFailed) and exc.__cause__ is not None:
                log.debug("".join(traceback.format_exception(exc.__cause__)))
            if hook == "startup":
                _fail(info, str(exc), registry.settings)
            else:
                log.error("plugin %s: %s", name, exc)
    return failed


def plugin_commands(registry: Registry, cli: Any) -> None:
    """Add the accepted plugins' CLI subcommands to ``cli``: a refused plugin has none (its
    ``register_commands`` ran against a scratch group when it was loaded)."""
    for name, commands in registry.commands.items():
        if registry.plugins[name].status != "loaded":
            continue
        for command in commands:
            cli.add_command(command)


__all__ = [
    "PluginError",
    "PluginInfo",
    "Registry",
    "build_registry",
    "load_plugins",
    "new_plugin_manager",
]
