"""Commands for a client of a running server: generate, jobs, files (over HTTP)."""

from __future__ import annotations

import functools
import json
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from kiapi_core.cli.startup import settings_from
from kiapi_core.jobs.status import TERMINAL, JobStatus

if TYPE_CHECKING:
    from kiapi_core.cli.http import Client, ProgressBar


F = TypeVar("F", bound=Callable[..., Any])


def _client(url: str | None) -> Client:
    from kiapi_core.cli.http import Client, default_url

    settings = settings_from()
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
        from kiapi_core.cli.http import ServerError, Unreachable

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
    from kiapi_core.cli.http import ServerError, Unreachable

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


# `kiapi generate --wait N` gave up waiting: the job runs on (EX_TEMPFAIL).
EXIT_STILL_RUNNING = 75


def _watch(client: Client, job_id: str, bar: ProgressBar, wait_s: float) -> dict[str, Any] | None:
    """The job once terminal, polled, or None when ``wait_s`` passes first."""
    deadline = time.monotonic() + wait_s
    while True:
        job: dict[str, Any] = client.call("GET", f"/v1/jobs/{job_id}")
        bar.update(job)
        if job["status"] in TERMINAL:
            return job
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def _cancel_on_interrupt(client: Client, job_id: str) -> None:
    from kiapi_core.cli.http import ServerError, Unreachable

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


@click.command()
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
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=None,
    help="Follow the job at most this many seconds; then exit 75, the job running on.",
)
@click.option(
    "--priority",
    type=click.IntRange(-10, 10),
    default=None,
    help="Job priority, -10..10: higher runs first (X-Kiapi-Priority).",
)
@click.option(
    "--idempotency-key",
    default=None,
    help="Run again with the same key and request: the same job, not a new one.",
)
@click.option(
    "--cancel-after",
    default=None,
    metavar="DURATION",
    help="A deadline (Cancel-After): 90, 30s, 5m; not started by then, the job never runs.",
)
@click.option(
    "--webhook",
    default=None,
    metavar="URL",
    help="POST the job's events here, signed (X-Kiapi-Webhook; docs/jobs.md#webhooks).",
)
@click.option(
    "--webhook-events",
    default=None,
    metavar="LIST",
    help="Which events: start,progress,completed (progress=2s for fewer); default start,completed.",
)
@click.option(
    "--no-wait",
    is_flag=True,
    help="Submit and print the job id at once; the job runs on (kiapi jobs show ID).",
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
    wait_s: float | None,
    priority: int | None,
    idempotency_key: str | None,
    cancel_after: str | None,
    webhook: str | None,
    webhook_events: str | None,
    no_wait: bool,
    url: str | None,
) -> None:
    """Make something with a capability of a running server, with a progress bar.

    PROMPT is the text, or @FILE (@- for stdin) holding text or a JSON caption. The job runs
    asynchronously; Ctrl-C cancels it on the server (exit status 130). With --wait N it is
    followed at most N seconds: then the command exits 75 and the job runs on; with --no-wait
    the command prints the job id and returns at once.
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
    from kiapi_core.cli.http import ProgressBar

    bar = ProgressBar(sys.stderr)
    try:
        given_headers = {
            "X-Kiapi-Priority": None if priority is None else str(priority),
            "Idempotency-Key": idempotency_key,
            "Cancel-After": cancel_after,
            "X-Kiapi-Webhook": webhook,
            "X-Kiapi-Webhook-Events": webhook_events,
        }
        headers = {k: v for k, v in given_headers.items() if v is not None}
        job_id = client.call("POST", path, body, headers=headers)["job_id"]
        click.echo(f"{job_id} submitted to {cap['domain']}/{cap['name']}", err=True)
        if no_wait:
            click.echo(f"job: {job_id}")
            return
        watched = (
            _follow(client, job_id, bar) if wait_s is None else _watch(client, job_id, bar, wait_s)
        )
        bar.close()
        if watched is None:
            click.echo(
                f"{job_id} not finished within {wait_s:g}s; it runs on: kiapi jobs show {job_id}",
                err=True,
            )
            click.echo(f"job: {job_id}")
            raise SystemExit(EXIT_STILL_RUNNING)
        job = watched
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


@click.group()
def jobs() -> None:
    """Jobs of a running server: list, show, cancel, retry, priority."""


@jobs.command(name="list")
@click.option("--status", type=click.Choice([s.value for s in JobStatus]), default=None)
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
    from kiapi_core.cli.http import eta_text

    rows = [["ID", "TYPE", "STATUS", "PROGRESS", "LABEL", "ETA", "CREATED"]]
    for job in page["jobs"]:
        progress = job["progress"]
        rows.append(
            [
                job["id"],
                job["type"],
                job["status"],
                "-" if progress is None else f"{progress * 100:.0f}%",
                job["progress_label"] or "",
                eta_text(job) or "-",
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


@jobs.command(name="retry")
@click.argument("job_id")
@click.option("--priority", type=click.IntRange(-10, 10), default=None, help="Else the original's.")
@click.option("--webhook", default=None, metavar="URL", help="Else the original's webhook.")
@remote
def jobs_retry(job_id: str, priority: int | None, webhook: str | None, url: str | None) -> None:
    """Run a failed or canceled job again: a new job with its params, linked to it."""
    headers = {"X-Kiapi-Priority": str(priority)} if priority is not None else {}
    if webhook is not None:
        headers["X-Kiapi-Webhook"] = webhook
    new = _client(url).call("POST", f"/v1/jobs/{job_id}/retry", headers=headers)
    click.echo(f"{job_id} retried as {new['id']}")
    click.echo(f"job: {new['id']}")


@jobs.command(name="priority")
@click.argument("job_id")
@click.argument("priority", type=click.IntRange(-10, 10))
@remote
def jobs_priority(job_id: str, priority: int, url: str | None) -> None:
    """Change a queued job's priority (-10..10, higher runs first)."""
    job = _client(url).call("PATCH", f"/v1/jobs/{job_id}", {"priority": priority})
    where = f", queue position {job['queue_position']}" if job.get("queue_position") else ""
    click.echo(f"{job_id} {job['status']}, priority {job['priority']}{where}")


@click.group()
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
