"""The ``kiapi`` command: serve, plugins, config, activate/deactivate weights, status, and the
client commands for a running server: generate, jobs, files.

Plugins add subcommands through the ``register_commands`` hook.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from kiapi_core.backends.cli import worker as worker_command

# The rest is imported by the commands that use it: importing this module stays cheap, so the
# start-up work (settings, plugins, the app) happens inside ``_gc_paused``.
if TYPE_CHECKING:
    from kiapi_core.client import Client, ProgressBar
    from kiapi_core.models.spec import ModelSpec
    from kiapi_core.settings import Settings


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection during start-up, and what it built moved out of reach.

    Start-up creates a great many objects that live as long as the process (modules, pydantic
    schemas, routes) and hardly any garbage; the ~110 collections it would otherwise trigger
    cost ~20 ms of a ~0.3 s cold start. Frozen (as the app's lifespan does too) rather than
    merely re-enabled, or the first collection after would scan everything anyway.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _settings(**overrides: Any) -> Settings:
    from pydantic import ValidationError

    from kiapi_core.settings import ConfigFileError, Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [
            f"  KIAPI_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}"
            for e in exc.errors()
            # A default built from a refused setting (files_dir from home) is a consequence.
            if e["type"] != "default_factory_not_called"
        ]
        raise click.ClickException("invalid settings:\n" + "\n".join(lines)) from None
    except ConfigFileError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.version_option(package_name="kiapi", prog_name="kiapi")
def cli() -> None:
    """kiapi: a local HTTP host for AI models, extended by pip-installable plugins."""


@cli.command()
@click.option("--host", default=None, help="Bind address (default 127.0.0.1, KIAPI_HOST).")
@click.option("--port", type=int, default=None, help="Port (default 8000, KIAPI_PORT).")
@click.option(
    "--workers", type=int, default=None, help="Model slots: jobs run at once (KIAPI_WORKERS)."
)
def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Start the HTTP server."""
    import logging

    with _gc_paused():
        import uvicorn

        from kiapi_core.app import create_app
        from kiapi_core.server_protocol import protocol_class

        settings = _settings(host=host, port=port, workers=workers)
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        from kiapi_core.plugins import PluginError

        if settings.api_key is None and not _loopback(settings.host):
            logging.getLogger("kiapi").warning(
                "binding %s without KIAPI_API_KEY: anyone who can reach this port can run jobs"
                " and read every file; set KIAPI_API_KEY (see SECURITY.md)",
                settings.host,
            )
        if settings.backend == "embedded":
            from kiapi_core.homelock import HomeLocked, lock_home

            try:
                lock_home(settings.home)  # held until the process exits
            except HomeLocked as exc:
                raise click.ClickException(str(exc)) from None
        try:
            app = create_app(settings)
        except PluginError as exc:
            raise click.ClickException(str(exc)) from None
    if settings.worker_mode == "thread":
        # A model thread running Python holds the GIL for up to the switch interval (5 ms by
        # default) before the event loop gets it back; 1 ms keeps status calls quick mid-run.
        sys.setswitchinterval(0.001)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=5,
        http=protocol_class(settings),
        ws=_websocket_protocol(),
    )


def _websocket_protocol() -> Any:
    """uvicorn's ``ws`` choice: its "auto" implementation, imported at the first upgrade.

    ``ws="auto"`` imports wsproto (and h11) or websockets while the server starts, ~17 ms of a
    ~0.3 s cold start, though most servers never see a WebSocket. uvicorn only ever calls the
    class with keyword arguments when a request upgrades, so a factory stands in for it.
    """
    import importlib.util

    if not any(importlib.util.find_spec(lib) for lib in ("websockets", "wsproto")):
        return "none"  # what "auto" resolves to then: upgrade requests are served as HTTP

    def protocol(**kwargs: Any) -> Any:
        from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

        assert AutoWebSocketsProtocol is not None
        return AutoWebSocketsProtocol(**kwargs)

    return protocol


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: assume it may be reachable from elsewhere


def _registry(settings: Settings) -> Any:
    from kiapi_core.plugins import PluginError, build_registry

    try:
        return build_registry(settings)
    except PluginError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List plugins: name, version, hooks, capabilities, load errors."""
    settings = _settings()
    registry = _registry(settings)
    rows = [info.as_dict() for info in registry.plugins.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        head = f"{row['name']} {row['version'] or ''}".strip()
        click.echo(f"{head}  [{row['status']}]" + ("  (built in)" if row["builtin"] else ""))
        click.echo(f"  module: {row['module']}")
        if row["hooks"]:
            click.echo(f"  hooks: {', '.join(row['hooks'])}")
        if row["capabilities"]:
            click.echo(f"  capabilities: {', '.join(row['capabilities'])}")
        if row["models"]:
            click.echo(f"  models: {', '.join(row['models'])}")
        for err in row["errors"]:
            click.echo(f"  error: {err}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def config(as_json: bool) -> None:
    """Show the effective settings (secrets masked)."""
    values = _settings().masked()
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


def _specs_named(registry: Any, name: str) -> list[ModelSpec]:
    wanted = name.lower()
    found = [
        s
        for s in registry.models
        if wanted in (s.family.lower(), s.key.lower(), *(n.lower() for n in s.names()))
    ]
    if not found:
        names = sorted({s.family for s in registry.models} | {s.key for s in registry.models})
        raise click.ClickException(
            f"no model or capability named {name!r}; known: {', '.join(names) or 'none'}"
        )
    return found


@cli.command()
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

    settings = _settings()
    registry = _registry(settings)
    weights = WeightsRegistry(settings.home)
    for spec in _specs_named(registry, name):
        if spec.weights is None:
            click.echo(f"{spec.key}: needs no weights")
            continue
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
        weights.activate(spec, target, source)
        click.echo(f"{spec.key}: active ({target})")


@cli.command()
@click.argument("name")
def deactivate(name: str) -> None:
    """Forget a model's weights (files on disk are left alone)."""
    from kiapi_core.models.weights import WeightsRegistry

    settings = _settings()
    registry = _registry(settings)
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


@cli.command()
@click.option("--url", default=None, help="A running server to ask about resident models.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(url: str | None, as_json: bool) -> None:
    """Which models are active (weights on disk) and resident (loaded in a running server)."""
    from kiapi_core.models.weights import WeightsRegistry, activation_command

    settings = _settings()
    registry = _registry(settings)
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
    if as_json:
        click.echo(
            json.dumps({"server": url if live is not None else None, "models": rows}, indent=2)
        )
        return
    click.echo(f"server: {url if live is not None else f'not reachable at {url}'}")
    for row, spec in zip(rows, registry.models, strict=True):
        active = "active" if row["active"] else f"not activated (run: {activation_command(spec)})"
        resident = {None: "", True: ", resident", False: ", not resident"}[row["resident"]]
        where = f" at {row['weights']}" if row["weights"] else ""
        click.echo(f"{row['model']}: {active}{where}{resident}, ~{row['memory_gb']:g} GB")


# -- client commands: talk to a running server ------------------------------------------------
F = TypeVar("F", bound=Callable[..., Any])
TERMINAL = ("succeeded", "failed", "canceled")


def _client(url: str | None) -> Client:
    from kiapi_core.client import Client, default_url

    settings = _settings()
    key = settings.api_key.get_secret_value() if settings.api_key else None
    return Client(url or default_url(settings.host, settings.port), key)


def remote(command: F) -> F:
    """``--url`` for a command that calls the server, and its errors as one readable line."""

    @click.option(
        "--url",
        envvar="KIAPI_URL",
        default=None,
        help="The server (default: http://KIAPI_HOST:KIAPI_PORT; KIAPI_URL). Sends"
        " 'Authorization: Bearer $KIAPI_API_KEY' when that is set.",
    )
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from kiapi_core.client import ServerError, Unreachable

        try:
            return command(*args, **kwargs)
        except ServerError as exc:
            raise click.ClickException(f"the server answered {exc.status}: {exc.message}") from None
        except Unreachable as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "-"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _operation(capability: dict[str, Any]) -> str | None:
    """The path a capability makes things with: its ``generate`` operation, else ``run``."""
    ops: dict[str, str] = capability.get("operations", {})
    return ops.get("generate") or ops.get("run")


def _capability(client: Client, name: str | None) -> dict[str, Any]:
    capabilities: list[dict[str, Any]] = client.call("GET", "/v1/capabilities")["data"]
    usable = [c for c in capabilities if _operation(c)]
    listed = ", ".join(f"{c['domain']}/{c['name']}" for c in usable) or "none"
    if name is None:
        if len(usable) == 1:
            return usable[0]
        raise click.UsageError(f"pass --capability, one of: {listed}")
    for capability in capabilities:
        if name in (capability["name"], f"{capability['domain']}/{capability['name']}"):
            if not _operation(capability):
                raise click.UsageError(f"{name} has no generate (or run) operation")
            return capability
    raise click.UsageError(f"the server has no capability {name!r}; it has: {listed}")


def _deref(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        section, name = schema["$ref"].split("/")[-2:]
        schema = doc["components"][section][name]
    return schema


def _request_fields(client: Client, capability: dict[str, Any], path: str) -> tuple[str, set[str]]:
    """The field the prompt goes in (``prompt``, else the only required text field) and every
    field the operation takes, from the capability's own OpenAPI document."""
    doc = client.call("GET", capability["openapi"])
    try:
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    except KeyError:
        return "prompt", set()
    schema = _deref(doc, body)
    properties: dict[str, Any] = schema.get("properties", {})
    if "prompt" in properties:
        return "prompt", set(properties)
    for name in schema.get("required", []):
        if _deref(doc, properties.get(name, {})).get("type") == "string":
            return name, set(properties)
    return "prompt", set(properties)


def _read_prompt(value: str) -> str | dict[str, Any]:
    """The prompt argument: text, or ``@FILE`` (``@-`` for stdin) holding text or a JSON caption."""
    if not value.startswith("@"):
        return value
    source = value[1:]
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise click.BadParameter(f"cannot read {source}: {exc}", param_hint="PROMPT") from None
    try:
        parsed = json.loads(text)
    except ValueError:
        return text.strip()
    return parsed if isinstance(parsed, dict) else text.strip()


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    width, x, height = value.lower().partition("x")
    if not (x and width.isdigit() and height.isdigit()):
        raise click.BadParameter(
            f"{value!r} is not WIDTHxHEIGHT, e.g. 1024x768", param_hint="--size"
        )
    return int(width), int(height)


def _follow(client: Client, job_id: str, bar: ProgressBar) -> dict[str, Any]:
    """The job once terminal, drawing its progress from the event stream (re-opened if it
    drops; the job itself is the truth)."""
    from kiapi_core.client import ServerError, Unreachable

    for _ in range(10):
        try:
            for event, job in client.events(job_id):
                bar.update(job)
                if event == "end" or job.get("status") in TERMINAL:
                    return job
        except (OSError, ServerError, Unreachable, ValueError):
            pass
        current: dict[str, Any] = client.call("GET", f"/v1/jobs/{job_id}")
        bar.update(current)
        if current["status"] in TERMINAL:
            return current
        time.sleep(1)
    raise click.ClickException(
        f"lost the progress stream of {job_id}; follow it with `kiapi jobs show {job_id}`"
    )


def _cancel_on_interrupt(client: Client, job_id: str) -> None:
    from kiapi_core.client import ServerError, Unreachable

    click.echo(f"\ninterrupted: canceling {job_id}", err=True)
    try:
        client.call("DELETE", f"/v1/jobs/{job_id}")
        # A running job stops at its next step; say how it ended when that is quick.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            job = client.call("GET", f"/v1/jobs/{job_id}")
            if job["status"] in TERMINAL:
                click.echo(f"{job_id} {job['status']}", err=True)
                break
            time.sleep(0.1)
    except (ServerError, Unreachable, KeyboardInterrupt) as exc:
        if not isinstance(exc, KeyboardInterrupt):
            click.echo(f"could not cancel {job_id}: {exc}", err=True)


@cli.command()
@click.argument("prompt")
@click.option("--capability", "-c", default=None, help="e.g. ideogram4 (or image/ideogram4).")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the result (default: its own file name, here).",
)
@click.option("--model", default=None, help="Model name or alias.")
@click.option("--preset", default=None, help="Sampler preset, e.g. V4_TURBO_12.")
@click.option("--size", default=None, help="WIDTHxHEIGHT in pixels, e.g. 1024x768.")
@click.option("--seed", type=int, default=None, help="Seed, for a reproducible result.")
@click.option("--format", "fmt", default=None, help="Output format, e.g. png, jpeg, webp.")
@click.option("--quality", type=int, default=None, help="Encoder quality (jpeg/webp).")
@click.option(
    "--param",
    "-p",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other request field (VALUE is read as JSON when it parses). Repeatable.",
)
@remote
def generate(
    prompt: str,
    capability: str | None,
    output: Path | None,
    model: str | None,
    preset: str | None,
    size: str | None,
    seed: int | None,
    fmt: str | None,
    quality: int | None,
    params: tuple[str, ...],
    url: str | None,
) -> None:
    """Make something with a capability of a running server, with a progress bar.

    PROMPT is the text, or @FILE (@- for stdin) holding text or a JSON caption. The job runs
    asynchronously; Ctrl-C cancels it on the server (exit status 130).
    """
    # Ctrl-C must cancel the job even when started from a shell that ignores SIGINT for
    # background commands (Python leaves an inherited "ignore" in place).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    client = _client(url)
    cap = _capability(client, capability)
    path = _operation(cap)
    assert path is not None
    prompt_field, fields = _request_fields(client, cap, path)
    body: dict[str, Any] = {prompt_field: _read_prompt(prompt), "mode": "async"}
    dimensions = _size(size)
    given = {
        "model": model,
        "preset": preset,
        "width": dimensions[0] if dimensions else None,
        "height": dimensions[1] if dimensions else None,
        "seed": seed,
        "format": fmt,
        "quality": quality,
    }
    body.update({k: v for k, v in given.items() if v is not None})
    for item in params:
        key, eq, value = item.partition("=")
        if not (eq and key):
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        body[key] = _json_value(value)
    unknown = sorted(set(body) - fields - {"mode"}) if fields else []
    if unknown:
        raise click.UsageError(
            f"{cap['name']} does not take {', '.join(unknown)}; it takes: {', '.join(sorted(fields))}"
        )
    job_id: str | None = None
    from kiapi_core.client import ProgressBar

    bar = ProgressBar(sys.stderr)
    try:
        job_id = client.call("POST", path, body)["job_id"]
        click.echo(f"{job_id} submitted to {cap['domain']}/{cap['name']}", err=True)
        job = _follow(client, job_id, bar)
        bar.close()
        if job["status"] != "succeeded":
            raise click.ClickException(f"{job_id} {job['status']}: {job.get('error')}")
        if not job["artifacts"]:
            raise click.ClickException(f"{job_id} succeeded but produced no file")
        file_id = job["artifacts"][0]
        if output is None:
            # Only the base name: a stored name never chooses a directory.
            output = Path(Path(client.call("GET", f"/v1/files/{file_id}")["filename"]).name)
        written, size_bytes = client.download(file_id, output)
    except KeyboardInterrupt:
        bar.close()
        if job_id is not None:
            _cancel_on_interrupt(client, job_id)
        raise SystemExit(130) from None
    click.echo(f"job: {job_id}")
    click.echo(f"file: {file_id} -> {written} ({size_bytes} bytes)")
    click.echo(f"params: {json.dumps(job['params'], ensure_ascii=False)}")


@cli.group()
def jobs() -> None:
    """Jobs of a running server: list, show, cancel."""


@jobs.command(name="list")
@click.option("--status", type=click.Choice(["queued", "running", *TERMINAL]), default=None)
@click.option("--type", "job_type", default=None, help="Only jobs of this type.")
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@remote
def jobs_list(
    status: str | None, job_type: str | None, limit: int, as_json: bool, url: str | None
) -> None:
    """The newest jobs first."""
    page = _client(url).call(
        "GET", "/v1/jobs", query={"status": status, "type": job_type, "limit": limit}
    )
    if as_json:
        click.echo(json.dumps(page["jobs"], indent=2))
        return
    rows = [["ID", "TYPE", "STATUS", "PROGRESS", "LABEL", "CREATED"]]
    for job in page["jobs"]:
        progress = job["progress"]
        rows.append(
            [
                job["id"],
                job["type"],
                job["status"],
                "-" if progress is None else f"{progress * 100:.0f}%",
                job["progress_label"] or "",
                _when(job["created_at"]),
            ]
        )
    _table(rows)


@jobs.command(name="show")
@click.argument("job_id")
@remote
def jobs_show(job_id: str, url: str | None) -> None:
    """A job as JSON: status, progress, params, result, artifacts."""
    click.echo(json.dumps(_client(url).call("GET", f"/v1/jobs/{job_id}"), indent=2))


@jobs.command(name="cancel")
@click.argument("job_id")
@remote
def jobs_cancel(job_id: str, url: str | None) -> None:
    """Cancel a queued or running job (a running one stops at its next step)."""
    job = _client(url).call("DELETE", f"/v1/jobs/{job_id}")
    if job["status"] == "canceled":
        click.echo(f"{job_id} canceled")
    else:
        click.echo(f"{job_id} {job['status']}: cancel requested, it stops at its next step")


@cli.group()
def files() -> None:
    """Files of a running server: list, download."""


@files.command(name="list")
@click.option("--job", "job_id", default=None, help="Only files this job produced.")
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@remote
def files_list(job_id: str | None, limit: int, as_json: bool, url: str | None) -> None:
    """The newest files first."""
    page = _client(url).call("GET", "/v1/files", query={"job_id": job_id, "limit": limit})
    if as_json:
        click.echo(json.dumps(page["files"], indent=2))
        return
    rows = [["ID", "BYTES", "TYPE", "NAME", "JOB", "CREATED"]]
    for f in page["files"]:
        rows.append(
            [
                f["id"],
                str(f["bytes"]),
                f["content_type"],
                f["filename"],
                f.get("job_id") or "-",
                _when(f["created_at"]),
            ]
        )
    _table(rows)


@files.command(name="download")
@click.argument("file_id")
@click.option(
    "-o",
    "--output",
    default=None,
    help="Where to write it (default: its own file name, here; - for stdout).",
)
@remote
def files_download(file_id: str, output: str | None, url: str | None) -> None:
    """Download a file's bytes."""
    client = _client(url)
    if output is None:
        # Only the base name: a stored name never chooses a directory.
        output = Path(client.call("GET", f"/v1/files/{file_id}")["filename"]).name
    written, size = client.download(file_id, None if output == "-" else Path(output))
    click.echo(f"{file_id} -> {written or 'stdout'} ({size} bytes)", err=output == "-")


# `kiapi worker` (scale-out) lives with the celery backend it runs.
cli.add_command(worker_command)


def main() -> None:
    with _gc_paused():
        _add_plugin_commands()
    sys.exit(cli.main(prog_name="kiapi"))


def _add_plugin_commands() -> None:
    from pydantic import ValidationError

    from kiapi_core.plugins import PluginError, load_plugins, plugin_commands
    from kiapi_core.settings import ConfigFileError, Settings

    try:
        settings = Settings()
    except (ValidationError, ConfigFileError):
        # The command itself reports bad settings, with the fix; plugin commands just go missing.
        return
    try:
        pm, infos = load_plugins(settings)
        plugin_commands(pm, infos, cli, settings)
    except PluginError as exc:
        click.echo(
            f"Error: {exc} (KIAPI_STRICT_PLUGINS=1 stops at the first plugin error)", err=True
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
