"""Commands for whoever runs the server: plugins, config, activate/deactivate weights, status."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kiapi_core.cli.startup import registry_from, settings_from
from kiapi_core.webhooks.signing import SECRETS_FILE, mask, split_secrets

if TYPE_CHECKING:
    from kiapi_core.models.spec import ModelSpec
    from kiapi_core.settings import Settings


def _check_rows(registry: Any, name: str) -> list[dict[str, Any]]:
    """The plugin's health checks, run now (each at most once per process) and waited for."""
    from kiapi_core.health import results

    if registry.plugins[name].status != "loaded":
        return []
    return [r.as_dict() for r in results(registry.checks.get(name, []), wait=True)]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--traceback", "tracebacks", is_flag=True, help="Show each load error's traceback.")
@click.option("--no-checks", is_flag=True, help="Do not run the plugins' health checks.")
def plugins(as_json: bool, tracebacks: bool, no_checks: bool) -> None:
    """List plugins: name, version, hooks, capabilities, load errors, health checks.

    Exits 1 when a plugin failed to load or one of its health checks failed.
    """
    settings = settings_from()
    registry = registry_from(settings)
    rows = []
    for name, info in registry.plugins.items():
        row = info.as_dict()
        row["checks"] = [] if no_checks else _check_rows(registry, name)
        if tracebacks:
            row["tracebacks"] = info.tracebacks
        rows.append(row)
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    unhealthy = [r["name"] for r in rows if any(c["status"] != "ok" for c in r["checks"])]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for row in rows:
            _show_plugin(row, tracebacks)
    if failed or unhealthy:
        parts = [f"failed to load: {', '.join(failed)}"] if failed else []
        parts += [f"failing health checks: {', '.join(unhealthy)}"] if unhealthy else []
        click.echo(f"kiapi plugins: {'; '.join(parts)}", err=True)
        sys.exit(1)


def _show_plugin(row: dict[str, Any], tracebacks: bool) -> None:
    head = f"{row['name']} {row['version'] or ''}".strip()
    state = row["status"]
    if any(c["status"] != "ok" for c in row["checks"]):
        state += ", check failed"
    click.echo(f"{head}  [{state}]" + ("  (built in)" if row["builtin"] else ""))
    click.echo(f"  module: {row['module']}")
    if row["hooks"]:
        click.echo(f"  hooks: {', '.join(row['hooks'])}")
    if row["capabilities"]:
        click.echo(f"  capabilities: {', '.join(row['capabilities'])}")
    if row["models"]:
        click.echo(f"  models: {', '.join(row['models'])}")
    if row["commands"]:
        click.echo(f"  commands: {', '.join(row['commands'])}")
    for check in row["checks"]:
        click.echo(f"  check {check['name']}: {check['status']} ({check['detail']})")
    for err in row["errors"]:
        click.echo(f"  error: {err}")
    if tracebacks:
        for text in row.get("tracebacks", []):
            click.echo("  " + text.rstrip().replace("\n", "\n  "))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def config(as_json: bool) -> None:
    """Show the effective settings (secrets masked)."""
    settings = settings_from()
    values = settings.masked()
    if as_json:
        click.echo(json.dumps(values, indent=2))
        return
    for key, value in values.items():
        if value is None:
            # Commented out: pasting `KIAPI_PLUGINS=` back would mean "load no plugins".
            click.echo(f"# KIAPI_{key.upper()} is not set")
        elif isinstance(value, list):
            click.echo(f"KIAPI_{key.upper()}={','.join(value)}")
        else:
            click.echo(f"KIAPI_{key.upper()}={value}")
    kept = settings.home / SECRETS_FILE
    if settings.webhook_secret is None and kept.is_file():
        shown = ", ".join(mask(s) for s in split_secrets(kept.read_text()))
        click.echo(f"# webhook secrets in {kept} (kiapi webhooks secret): {shown}")


def _specs_named(registry: Any, name: str) -> list[ModelSpec]:
    wanted = name.lower()
    found = [
        s
        for s in registry.models
        if wanted in (s.family.lower(), s.key.lower(), *(n.lower() for n in s.names()))
    ]
    if not found:
        names = sorted({s.family for s in registry.models} | {s.key for s in registry.models})
        failed = sorted(registry.errors())
        why = f" (failed to load: {', '.join(failed)}; see `kiapi plugins`)" if failed else ""
        raise click.ClickException(
            f"no model or capability named {name!r}; known: {', '.join(names) or 'none'}{why}"
        )
    return found


def _refuse_unhealthy(registry: Any, spec: ModelSpec) -> None:
    """Stop before a download when the plugin cannot run here anyway (its health checks)."""
    owner = registry.owner.get(("model", f"{spec.family}/{spec.name.lower()}"))
    for check in _check_rows(registry, owner) if owner else []:
        if check["status"] != "ok":
            raise click.ClickException(
                f"{spec.key}: plugin {owner!r} cannot run on this machine: its health check"
                f" {check['name']!r} failed: {check['detail']}. Nothing was downloaded or"
                " registered; fix that first (`kiapi plugins` shows every check)"
            )


@click.command()
@click.argument("name")
@click.option(
    "--path",
    "path",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Register weights already on disk instead of downloading.",
)
def activate(name: str, path: Path | None) -> None:
    """Download (or register local) weights for a model so requests can use it."""
    from kiapi_core.models.weights import WeightsRegistry

    settings = settings_from()
    registry = registry_from(settings)
    weights = WeightsRegistry(settings.home)
    for spec in _specs_named(registry, name):
        if spec.weights is None:
            click.echo(f"{spec.key}: needs no weights")
            continue
        _refuse_unhealthy(registry, spec)
        if path is not None:
            target, source = path.expanduser().resolve(), "path"
            if not target.is_dir():
                raise click.ClickException(f"{target} is not a directory")
        else:
            click.echo(f"{spec.key}: downloading {spec.weights.source} ...")
            try:
                target, source = spec.weights.download(), spec.weights.source
            except Exception as exc:
                raise click.ClickException(str(exc)) from None
        try:
            spec.weights.validate(target)
        except ValueError as exc:
            raise click.ClickException(
                f"{target} is not a usable checkpoint for {spec.key}: {exc}"
            ) from None
        except Exception as exc:  # the plugin's checker itself broke (e.g. a failing import)
            raise click.ClickException(
                f"could not check {target} for {spec.key}: {type(exc).__name__}: {exc}"
            ) from None
        weights.activate(spec, target, source)
        click.echo(f"{spec.key}: active ({target})")


@click.command()
@click.argument("name")
def deactivate(name: str) -> None:
    """Forget a model's weights (files on disk are left alone)."""
    from kiapi_core.models.weights import WeightsRegistry

    settings = settings_from()
    registry = registry_from(settings)
    weights = WeightsRegistry(settings.home)
    for spec in _specs_named(registry, name):
        if spec.weights is None:
            continue
        done = weights.deactivate(spec)
        click.echo(f"{spec.key}: {'deactivated' if done else 'was not active'}")


def _server_models(url: str, settings: Settings) -> dict[str, dict[str, Any]] | None:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url.rstrip("/") + "/v1/models")
    if settings.api_key is not None:
        request.add_header("Authorization", f"Bearer {settings.api_key.get_secret_value()}")
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            return {m["id"]: m for m in json.load(resp)["data"]}
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


@click.command()
@click.option("--url", default=None, help="A running server to ask about resident models.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(url: str | None, as_json: bool) -> None:
    """Which models are active (weights on disk) and resident (loaded in a running server)."""
    from kiapi_core.models.weights import WeightsRegistry, activation_command

    settings = settings_from()
    registry = registry_from(settings)
    weights = WeightsRegistry(settings.home)
    url = url or f"http://{settings.host}:{settings.port}"
    live = _server_models(url, settings)
    rows = []
    for spec in registry.models:
        path = weights.path_for(spec) if spec.weights else None
        rows.append(
            {
                "model": spec.key,
                "aliases": list(spec.aliases),
                "active": spec.weights is None or path is not None,
                "weights": str(path) if path else None,
                "memory_gb": spec.memory_gb,
                "resident": None if live is None else bool(live.get(spec.key, {}).get("resident")),
            }
        )
    checks = {n: c for n in registry.plugins if (c := _check_rows(registry, n))}
    if as_json:
        server = url if live is not None else None
        click.echo(json.dumps({"server": server, "models": rows, "checks": checks}, indent=2))
        return
    click.echo(f"server: {url if live is not None else f'not reachable at {url}'}")
    for row, spec in zip(rows, registry.models, strict=True):
        active = "active" if row["active"] else f"not activated (run: {activation_command(spec)})"
        resident = {None: "", True: ", resident", False: ", not resident"}[row["resident"]]
        where = f" at {row['weights']}" if row["weights"] else ""
        click.echo(f"{row['model']}: {active}{where}{resident}, ~{row['memory_gb']:g} GB")
    for plugin, found in checks.items():
        for check in found:
            click.echo(
                f"plugin {plugin}: check {check['name']} {check['status']} ({check['detail']})"
            )
