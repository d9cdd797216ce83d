"""The host's own documents: health, models, capabilities, and the error every route answers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from kiapi_core.web.schema import Schema


class Error(Schema):
    detail: Any = Field(description="What went wrong: a message, or a list of {loc, msg, type}.")


class CheckStatus(Schema):
    name: str
    status: str = Field(
        description="pending (started by this request or an earlier one), ok or failed."
    )
    detail: str = Field(description="What the check found (e.g. the device), or why it failed.")
    seconds: float | None = Field(description="How long it took; null while pending.")


class PluginStatus(Schema):
    name: str
    version: str | None = None
    status: str = Field(description="loaded, failed or disabled.")
    capabilities: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)
    checks: list[CheckStatus] = Field(
        default_factory=list,
        description="The plugin's health checks, run once per server process on first use.",
    )


class Health(Schema):
    status: str = Field(
        description="ok, or degraded when a plugin failed to load or a health check failed."
    )
    readiness: Literal["starting", "ready", "busy", "degraded"] = Field(
        description=(
            "Whether a job would start now (Cog's states): `starting` (a health check is still"
            " running, or the first model load is under way), `ready`, `busy` (every job slot"
            " runs a job: a new one waits), `degraded` (a plugin failed to load, a health check"
            " failed, or, with the celery backend, no `kiapi worker` is up)."
        )
    )
    version: str
    uptime_s: float
    queue: dict[str, int] = Field(description="Jobs waiting and running.")
    models: dict[str, float] = Field(
        description="Resident, transient and loading model counts, memory used and budget (GB)."
    )
    plugins: list[PluginStatus]
    worker: dict[str, Any] = Field(
        description=(
            "How jobs run: `mode` process (with the worker's `pid`, null until the first job, "
            "`restarts` after crashes, planned `recycles` and its resident memory `rss_mb`), "
            "thread (with the server's `rss_mb`), or celery (with the live `workers`)."
        )
    )


class ModelInfo(Schema):
    """An OpenAI Model object (`id`, `object`, `created`, `owned_by`) with kiapi's fields."""

    id: str = Field(
        description="`family/name`; also accepted as `model` by /v1/images/generations."
    )
    object: str = "model"
    created: int = Field(description="Unix time this server started serving it.")
    owned_by: str = Field(description="The plugin that serves it.")
    name: str
    family: str
    domain: str
    aliases: list[str] = Field(default_factory=list)
    default: bool = False
    features: list[str] = Field(default_factory=list)
    memory_gb: float = Field(description="Estimated memory when resident.")
    active: bool = Field(description="Weights are available locally (or none are needed).")
    resident: bool = Field(description="Loaded in memory now (anywhere, with celery).")
    expires_at: float | None = Field(
        None,
        description=(
            "Unix time its idle unload happens (the last job's keep_alive, else"
            " KIAPI_MODEL_IDLE_TTL_S); null when not resident, in use, or kept (keep_alive -1)."
        ),
    )
    in_use: int = Field(0, description="Jobs using it right now.")
    loads: int = Field(description="Times loaded as a resident model since the server started.")
    transient_loads: int = Field(description="One-off transient loads (e.g. a quantize override).")
    activate_command: str | None = Field(
        None,
        description="The command that activates its weights (`kiapi activate FAMILY`) while"
        " `active` is false; null once active.",
    )


class ModelList(Schema):
    object: str = "list"
    data: list[ModelInfo]


class CapabilityInfo(Schema):
    name: str = Field(description="Capability name, e.g. the `--capability` of `kiapi generate`.")
    domain: str = Field(description="Its domain: the capability owns `/v1/{domain}/{name}/`.")
    title: str
    description: str
    plugin: str = Field(description="The plugin that serves it.")
    openapi: str = Field(description="Path of the capability's own OpenAPI document.")
    operations: dict[str, str] = Field(
        description="Its POST operations by last path segment, e.g. `generate`, `validate`."
    )
    models: list[str] = Field(description="Model ids (`family/name`) of its family.")


class CapabilityList(Schema):
    object: str = "list"
    data: list[CapabilityInfo]
