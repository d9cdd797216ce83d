"""Host settings: `KIAPI_*` environment variables, an optional TOML config file, CLI flags."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from types import UnionType
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)


def _total_ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        return 16.0


def default_home() -> Path:
    """The server's home folder: ``KIAPI_HOME``, else ``~/.kiapi``."""
    return Path(os.environ.get("KIAPI_HOME") or Path.home() / ".kiapi")


def _csv(value: Any) -> Any:
    # Env vars arrive as "a,b"; lists from TOML or code pass through.
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class ConfigFileError(Exception):
    """The TOML config file is missing (when named explicitly), unreadable, or has unknown keys.

    Not a ValueError: raised while the settings validate, pydantic would report a ValueError
    as a field's error, but the file is no field's fault.
    """


def env_values(prefix: str, names: Iterable[str]) -> dict[str, str]:
    """The environment's ``<prefix><NAME>`` variables for these names, as raw strings.

    Names match in any case (``KIAPI_PORT`` or ``kiapi_port``), as pydantic-settings matched
    them; variables naming no setting are left alone: they may be meant for a plugin.
    """
    wanted = {f"{prefix}{name}".lower(): name for name in names}
    return {wanted[k.lower()]: v for k, v in os.environ.items() if k.lower() in wanted}


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    """The values a ``Literal`` annotation allows, through ``Optional``/unions."""
    origin = get_origin(annotation)
    if origin is Literal:
        return get_args(annotation)
    if origin is Union or origin is UnionType:
        return tuple(v for arg in get_args(annotation) for v in _literal_choices(arg))
    return ()


def env_value(annotation: Any, raw: str) -> Any:
    """An environment string as the field declares it, where pydantic alone would refuse it.

    pydantic converts ``"8"`` for an ``int`` field but compares a ``Literal`` as is, so
    ``Literal[4, 8]`` would refuse ``"8"`` from the environment: the choice whose text it is
    stands in for it. Anything else is left for the field's own validation.
    """
    choices = _literal_choices(annotation)
    if raw in choices:
        return raw
    text = raw.strip()
    return next((c for c in choices if not isinstance(c, str) and str(c) == text), raw)


def config_file_values(known: Iterable[str]) -> dict[str, Any]:
    """`KIAPI_CONFIG` (default `$KIAPI_HOME/config.toml`) when it exists, as settings.

    Keys are the setting names without the prefix, e.g. `max_queue = 16`.
    """
    named = os.environ.get("KIAPI_CONFIG")
    path = Path(named) if named else default_home() / "config.toml"
    if not path.is_file():
        if named:
            # A file asked for by name and not found is a typo, not "no config".
            raise ConfigFileError(f"KIAPI_CONFIG={named}: no such file")
        return {}
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigFileError(f"config file {path}: {exc}") from None
    values = {k.lower(): v for k, v in data.items()}
    known = set(known)
    # Tables (``[name]``) are left for plugins to read.
    unknown = sorted(k for k, v in values.items() if k not in known and not isinstance(v, dict))
    if unknown:
        # The environment's strangers are ignored (any KIAPI_* var may be meant for a plugin),
        # but a key in our own file that matches nothing is a typo that would silently not apply.
        raise ConfigFileError(
            f"config file {path}: unknown setting(s) {', '.join(unknown)};"
            f" known: {', '.join(sorted(known))}"
        )
    return {k: v for k, v in values.items() if k in known}


class EnvSettings(BaseModel):
    """Settings read from environment variables: field ``name`` from ``<env_prefix>NAME`` (in
    any case); keyword arguments win over the environment, and defaults fill in the rest.

    A plugin's settings subclass it with their own prefix (``env_prefix = "KIAPI_SHOUT_"``).
    Values arrive as strings and are validated as the field declares (``"8"`` for an int,
    ``"true"`` or ``"1"`` for a bool). A plain pydantic model, not pydantic-settings: that
    library's import alone was ~40 ms of every start.
    """

    # hide_input_in_errors: a refused secret (KIAPI_API_KEY, KIAPI_REDIS_URL) must not be
    # echoed into a traceback or a log.
    # defer_build: a plugin's settings class is built when first read, not when imported.
    model_config = ConfigDict(
        extra="ignore", validate_default=True, hide_input_in_errors=True, defer_build=True
    )

    env_prefix: ClassVar[str] = "KIAPI_"

    @model_validator(mode="before")
    @classmethod
    def _with_sources(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {**cls.source_values(), **data}

    @classmethod
    def source_values(cls) -> dict[str, Any]:
        """What the environment (and, for the host, its config file) sets."""
        fields = cls.model_fields
        return {
            name: env_value(fields[name].annotation, raw)
            for name, raw in env_values(cls.env_prefix, fields).items()
        }


class Settings(EnvSettings):
    """The host's settings: ``KIAPI_*`` environment variables, then the config file, then
    these defaults (``kiapi config`` lists them with their descriptions)."""

    home: Path = Field(
        default_factory=default_home, description="Where jobs, files and weights live."
    )
    host: str = Field(default="127.0.0.1", description="Bind address for `kiapi serve`.")
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: str = "info"

    api_key: SecretStr | None = Field(
        default=None, description="Enables bearer auth on every route but /health."
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Allowed CORS origins; empty = off."
    )

    plugins: list[str] | None = Field(
        default=None, description="Load only these plugins (entry-point names)."
    )
    disable_plugins: list[str] = Field(
        default_factory=list, description="Never load these plugins."
    )
    strict_plugins: bool = Field(default=False, description="A plugin error aborts start-up.")
    trace_plugins: bool = Field(
        default=False, description="Log every plugin hook call with its arguments and results."
    )

    max_body_bytes: int = Field(
        # The largest real body (a 32768-character ideogram4 prompt, or its caption as JSON,
        # with every other field) is well under 200 KB; what a body may hold bounds what one
        # request costs to parse.
        default=1_048_576,
        ge=1,
        description="Largest JSON request body (413 beyond).",
    )
    max_json_values: int = Field(
        default=100_000,
        ge=1,
        description="Most values (items, members, containers) one JSON body may hold; counted"
        " before parsing, so no body builds millions of objects (422 beyond).",
    )
    max_upload_bytes: int = Field(default=1024**3, ge=1, description="Largest file upload.")
    max_queue: int = Field(
        default=64, ge=0, description="Waiting jobs beyond this are refused with 429."
    )
    workers: int = Field(
        default=1, ge=1, le=64, description="Model slots: jobs run at once, one thread each."
    )
    worker_mode: Literal["process", "thread"] = Field(
        default="process",
        description=(
            "process: jobs run in a worker process the server starts on demand (the API never "
            "waits on model code for the GIL, and a crash in model code restarts the worker, "
            "not the server); thread: in the server process (plugins registered in code)."
        ),
    )
    worker_nice: int = Field(
        # Nice only matters under contention: an otherwise idle machine runs models at full
        # speed, while a busy one serves status calls first (measured p99 ~4.8 ms vs ~5.9 at 10).
        default=19,
        ge=0,
        le=19,
        description="Added to the nice value of the worker (process or threads) so the API stays responsive.",
    )
    worker_sched_idle: bool = Field(
        default=True,
        description=(
            "Linux, KIAPI_WORKER_MODE=process: run the worker process under SCHED_IDLE, on CPU "
            "time nothing else wants, so requests never wait behind a model (other busy "
            "programs slow the model down). Threads in the server get nice only."
        ),
    )
    sync_timeout_s: float = Field(
        default=600.0, gt=0, description="Longest a sync request waits (then 504)."
    )
    job_timeout_s: float = Field(
        default=0.0, ge=0, description="A job running longer fails; 0 = no limit."
    )
    # -- submits (docs/jobs.md) ------------------------------------------------------------
    idempotency_ttl_s: float = Field(
        default=86400.0,
        gt=0,
        le=30 * 86400,
        description="How long an Idempotency-Key is remembered: a repeat within it gets the"
        " same job.",
    )
    # -- job events (docs/jobs.md, "Following jobs") -------------------------------------
    events_retain: int = Field(
        default=100_000,
        ge=1000,
        le=10_000_000,
        description="Job changes the event journal keeps for resuming SSE streams"
        " (Last-Event-ID); an older id restarts the stream with an `event: reset`.",
    )
    sse_keepalive_s: float = Field(
        default=15.0,
        gt=0,
        le=300,
        description="An idle SSE stream gets a comment line this often (proxies keep it open).",
    )
    deadline_sweep_s: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="How often queued jobs past their deadline (Cancel-After) are canceled.",
    )
    # -- webhooks (docs/jobs.md#webhooks, kiapi_core/webhooks/) -----------------------------
    webhook_url: str | None = Field(
        default=None,
        description="Webhook of every job whose submit names none (X-Kiapi-Webhook); unset = none.",
    )
    webhook_events: list[str] = Field(
        default_factory=lambda: ["start", "completed"],
        description="Events sent when a submit names none: start, progress (or progress=500ms),"
        " completed.",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="Signing secret(s), whsec_..., newest first (comma-separated while rotating);"
        " unset: one generated and kept in KIAPI_HOME/webhook_secrets (kiapi webhooks rotate).",
    )
    webhook_allow: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1", "localhost"],
        description="Allowed webhook targets: networks (CIDR) and host names (*.example.com);"
        " any other URL is refused with 422, and re-checked on its addresses at each attempt.",
    )
    webhook_progress_interval_ms: int = Field(
        default=1000,
        ge=0,
        le=3_600_000,
        description="Progress webhooks of one job at most this often (a submit may ask for"
        " less often: progress=5s).",
    )
    webhook_timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="Longest one webhook attempt may take."
    )
    webhook_max_attempts: int = Field(
        default=8, ge=1, le=100, description="Attempts of one webhook delivery before it fails."
    )
    webhook_backoff_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="Wait after a failed webhook attempt, doubled after each (with jitter).",
    )
    webhook_backoff_max_s: float = Field(
        default=300.0, gt=0, description="Longest wait between two webhook attempts."
    )
    webhook_workers: int = Field(
        default=4, ge=1, le=64, description="Webhook deliveries this node sends at once."
    )
    webhook_deliver: bool = Field(
        default=True,
        description="This node (server or kiapi worker) sends webhooks from the shared outbox.",
    )
    store_busy_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="Longest a request waits (off the event loop) for kiapi.db locked by another"
        " process; then 503 + Retry-After.",
    )
    # -- live previews (docs/jobs.md, Previews) ---------------------------------------------
    previews: bool = Field(
        default=True,
        description="Running jobs publish live previews (GET /v1/jobs/{id}/preview, SSE"
        " `preview` events); false turns them off for every job.",
    )
    preview_every: int = Field(
        default=1,
        ge=1,
        le=1000,
        description="A preview at every this-many-th step (denoising step) at most.",
    )
    preview_min_interval_s: float = Field(
        default=0.5,
        ge=0,
        le=3600,
        description="At least this long between two previews of one job.",
    )
    # -- what one job may cost the worker (SECURITY.md, limits) -----------------------------
    max_result_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        description="Largest job result, as JSON; a handler returning more fails its job"
        " (large outputs belong in files).",
    )
    cancel_grace_s: float = Field(
        default=15.0,
        gt=0,
        description="A running job that has not stopped this long after its cancel is abandoned:"
        " the worker process is restarted (thread mode: its thread is left behind).",
    )
    worker_max_rss_mb: float = Field(
        default=0.0,
        ge=0,
        description="KIAPI_WORKER_MODE=process: a worker process whose resident memory is past"
        " this after a job exits and is restarted for the next; 0 = off.",
    )
    worker_heap_idle_s: float = Field(
        default=30.0,
        ge=0,
        description="Linux: a worker keeps the memory a job freed for the next job (no page"
        " faults, generations ~16% faster on the CPU) and gives it back after this long"
        " without a job; 0 = at once.",
    )
    files_ttl_s: float = Field(
        default=0.0, ge=0, description="Delete files older than this; 0 = keep."
    )
    jobs_ttl_s: float = Field(
        default=0.0,
        ge=0,
        description="Delete jobs this long after they finished (their files stay until"
        " KIAPI_FILES_TTL_S); 0 = keep.",
    )
    disk_reserve_bytes: int = Field(
        default=1024**2,
        ge=0,
        description=(
            "Space set aside next to kiapi.db: on a full disk it is released so a job's end and"
            " a file's deletion are still recorded; re-created once there is room. 0 = off."
        ),
    )
    access_log: bool = Field(default=False, description="Log every request (costs throughput).")
    sweep_interval_s: float = Field(
        default=60.0, gt=0, description="How often retention and idle-TTL run."
    )

    # -- connections (kiapi_core/web/protocol.py) ---------------------------------------
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A connection must send a complete request line and headers within this"
        " long of opening (or of starting a later request on it); else it is closed.",
    )
    max_header_bytes: int = Field(
        default=65_536,
        ge=1024,
        description="Largest request line plus headers, in bytes; more is answered 431.",
    )
    max_headers: int = Field(
        default=100, ge=1, description="Most header fields in one request; more is answered 431."
    )
    max_connections: int = Field(
        default=1000,
        ge=1,
        description="Open connections at most; more are answered 503 and closed at once"
        " (lowered at start-up if the open-files limit cannot hold it).",
    )

    memory_limit_gb: float = Field(
        default_factory=lambda: round(_total_ram_gb() * 0.8, 1),
        gt=0,
        description="Budget for resident models; idle ones are evicted to stay under it.",
    )
    model_idle_ttl_s: float = Field(
        default=1800.0, ge=0, description="Unload a model idle this long; 0 = never."
    )
    max_keep_alive_s: float = Field(
        default=86400.0,
        gt=0,
        description="Longest keep_alive a request may ask for (X-Kiapi-Keep-Alive, body"
        " `keep_alive`); -1 (keep) and 0 (unload after the job) are always allowed.",
    )
    route_by_residency: bool = Field(
        default=True,
        description="Celery: send a job to a kiapi worker that holds its model (its own"
        " queue), else to the shared queue of its type; false: always the shared queue.",
    )

    # -- scale-out (docs/scale-out.md) -----------------------------------------------------
    files_dir: Path = Field(
        default_factory=lambda data: data["home"] / "files",
        description="Stored files (blobs); with the celery backend a directory every node shares.",
    )
    backend: Literal["embedded", "celery"] = Field(
        default="embedded",
        description="embedded: SQLite + in-process worker; celery: Redis state + `kiapi worker`s.",
    )
    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis for the celery backend (job/file state, broker, events), e.g. redis://host:6379/0.",
    )
    redis_prefix: str = Field(
        default="kiapi",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Namespace of every Redis key and queue, so deployments can share one Redis.",
    )
    job_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="celery: a worker renews its claim on a running job every third of this;"
        " a job whose claim lapses (worker lost) is re-queued.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="celery: runs of one job (worker lost mid-job) before it fails for good.",
    )
    celery_visibility_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="celery: an unacknowledged message is redelivered after this (broker side).",
    )

    @field_validator("api_key")
    @classmethod
    def _non_empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty key would either let everyone in or lock everyone out; neither is meant.
        if value is None:
            return value
        key = value.get_secret_value()
        if not key.strip():
            raise ValueError("is empty: unset KIAPI_API_KEY to turn auth off, or give it a value")
        # Clients' tokens are stripped before the comparison and a header cannot carry control
        # characters, so such a key would lock every client out. The message never shows it.
        if key != key.strip():
            raise ValueError(
                "has leading or trailing whitespace (a stray space, tab or newline from a"
                " copy or an echo?): remove it"
            )
        if any(ord(c) < 32 or ord(c) == 127 for c in key):
            raise ValueError("contains control characters, which no HTTP header can carry")
        return value

    @field_validator(
        "plugins",
        "disable_plugins",
        "cors_origins",
        "webhook_events",
        "webhook_allow",
        mode="before",
    )
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        return _csv(value)

    @field_validator("webhook_secret")
    @classmethod
    def _whsec(cls, value: SecretStr | None) -> SecretStr | None:
        from kiapi_core.webhooks.signing import key_of, split_secrets

        if value is not None:
            secrets = split_secrets(value.get_secret_value())
            if not secrets:
                raise ValueError("is empty: unset it to have one generated under KIAPI_HOME")
            for secret in secrets:
                key_of(secret)  # BadSecret (a ValueError) names the rule, never the value
        return value

    @field_validator("webhook_events")
    @classmethod
    def _known_events(cls, value: list[str]) -> list[str]:
        from kiapi_core.webhooks.spec import parse_events

        parse_events(value, 0)
        return value

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        from kiapi_core.webhooks.targets import parse_target

        if value is not None:
            parse_target(value)  # TargetRefused (a ValueError) names the rule
        return value

    @field_validator("redis_url")
    @classmethod
    def _backend_needs_redis(
        cls, value: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        # Runs on the default too (validate_default), so a missing URL is caught at start-up.
        if info.data.get("backend") == "celery" and value is None:
            raise ValueError("is required with KIAPI_BACKEND=celery, e.g. redis://127.0.0.1:6379/0")
        return value

    @classmethod
    def source_values(cls) -> dict[str, Any]:
        return {**config_file_values(cls.model_fields), **super().source_values()}

    @cached_property
    def db_path(self) -> Path:
        return self.home / "kiapi.db"

    def masked(self) -> dict[str, Any]:
        """Effective settings as JSON-able values, secrets replaced by '***'."""
        out = self.model_dump(mode="json")
        for name in type(self).model_fields:
            if isinstance(getattr(self, name), SecretStr):
                out[name] = "***"
        return out
