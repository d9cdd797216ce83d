"""kiapi: a small, fast HTTP host for local AI models whose capabilities arrive as plugins.

``import kiapi_core`` is the plugin API: every name in ``__all__`` (listed with signatures in
docs/api.md) keeps working through the 0.x minor versions, with a deprecation period before
any change. Everything else under ``kiapi_core`` is internal and may move at any time.

Importing this package stays cheap: names that would pull in more than the host needs to
start (Starlette, pydantic, the stores) are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kiapi_core.capabilities import Capability
from kiapi_core.hookspecs import hookimpl
from kiapi_core.models.spec import (
    LoadOptions,
    ModelSpec,
    Weights,
    describe_choices,
    require_model,
    resolve_model,
)

if TYPE_CHECKING:
    from kiapi_core.health import CheckFailed as CheckFailed
    from kiapi_core.health import HealthCheck as HealthCheck
    from kiapi_core.health import python_check as python_check
    from kiapi_core.host import Host as Host
    from kiapi_core.host import host as host_of
    from kiapi_core.images.encode import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS
    from kiapi_core.images.encode import IMAGE_MEDIA_TYPES as IMAGE_MEDIA_TYPES
    from kiapi_core.images.encode import encode_image as encode_image
    from kiapi_core.images.generator import ImageGenerator as ImageGenerator
    from kiapi_core.images.generator import ImageParamError as ImageParamError
    from kiapi_core.images.generator import ImageRequest as ImageRequest
    from kiapi_core.jobs.context import JobCanceled as JobCanceled
    from kiapi_core.jobs.context import JobContext as JobContext
    from kiapi_core.jobs.context import JobHandler as JobHandler
    from kiapi_core.jobs.errors import JobFailed as JobFailed
    from kiapi_core.jobs.errors import JobInputError as JobInputError
    from kiapi_core.jobs.options import KeepAlive as KeepAlive
    from kiapi_core.jobs.options import Previews as Previews
    from kiapi_core.jobs.options import WebhookEvents as WebhookEvents
    from kiapi_core.jobs.options import WebhookUrl as WebhookUrl
    from kiapi_core.jobs.phases import PhaseClock as PhaseClock
    from kiapi_core.jobs.phases import StepProgress as StepProgress
    from kiapi_core.jobs.phases import decode_fraction as decode_fraction
    from kiapi_core.jobs.phases import phase_clock as phase_clock
    from kiapi_core.jobs.respond import respond_with_job as respond_with_job
    from kiapi_core.jobs.schemas import typed_job as typed_job
    from kiapi_core.models.weights import activation_command as activation_command
    from kiapi_core.models.weights import missing_weights as missing_weights
    from kiapi_core.operations import Operation as Operation
    from kiapi_core.runtime.blas import ensure_fast_blas as ensure_fast_blas
    from kiapi_core.settings import EnvSettings as EnvSettings
    from kiapi_core.settings import Settings as Settings
    from kiapi_core.web.body import JsonRefused as JsonRefused
    from kiapi_core.web.body import parse_json_text as parse_json_text
    from kiapi_core.web.body import read_json as read_json
    from kiapi_core.web.errors import ApiError as ApiError
    from kiapi_core.web.errors import invalid as invalid
    from kiapi_core.web.openapi import cached_fragment as cached_fragment
    from kiapi_core.web.openapi import error_response as error_response
    from kiapi_core.web.openapi import json_response as json_response
    from kiapi_core.web.schema import Schema as Schema
    from kiapi_core.web.schema import components_from as components_from
    from kiapi_core.web.schema import optional as optional
    from kiapi_core.web.schema import ref as ref

# Public name -> the internal module defining it (imported when the name is first used).
_LAZY = {
    "ApiError": "kiapi_core.web.errors",
    "IMAGE_EXTENSIONS": "kiapi_core.images.encode",
    "IMAGE_MEDIA_TYPES": "kiapi_core.images.encode",
    "encode_image": "kiapi_core.images.encode",
    "ensure_fast_blas": "kiapi_core.runtime.blas",
    "CheckFailed": "kiapi_core.health",
    "HealthCheck": "kiapi_core.health",
    "JobFailed": "kiapi_core.jobs.errors",
    "python_check": "kiapi_core.health",
    "Host": "kiapi_core.host",
    "ImageGenerator": "kiapi_core.images.generator",
    "ImageParamError": "kiapi_core.images.generator",
    "ImageRequest": "kiapi_core.images.generator",
    "JobCanceled": "kiapi_core.jobs.context",
    "JobContext": "kiapi_core.jobs.context",
    "JobHandler": "kiapi_core.jobs.context",
    "JobInputError": "kiapi_core.jobs.errors",
    "JsonRefused": "kiapi_core.web.body",
    "KeepAlive": "kiapi_core.jobs.options",
    "Previews": "kiapi_core.jobs.options",
    "WebhookEvents": "kiapi_core.jobs.options",
    "WebhookUrl": "kiapi_core.jobs.options",
    "PhaseClock": "kiapi_core.jobs.phases",
    "StepProgress": "kiapi_core.jobs.phases",
    "decode_fraction": "kiapi_core.jobs.phases",
    "phase_clock": "kiapi_core.jobs.phases",
    "Operation": "kiapi_core.operations",
    "Settings": "kiapi_core.settings",
    "EnvSettings": "kiapi_core.settings",
    "activation_command": "kiapi_core.models.weights",
    "Schema": "kiapi_core.web.schema",
    "components_from": "kiapi_core.web.schema",
    "cached_fragment": "kiapi_core.web.openapi",
    "error_response": "kiapi_core.web.openapi",
    # Not `host`: that name is the submodule kiapi_core.host once anything imports it.
    "host_of": "kiapi_core.host:host",
    "invalid": "kiapi_core.web.errors",
    "json_response": "kiapi_core.web.openapi",
    "missing_weights": "kiapi_core.models.weights",
    "optional": "kiapi_core.web.schema",
    "parse_json_text": "kiapi_core.web.body",
    "read_json": "kiapi_core.web.body",
    "ref": "kiapi_core.web.schema",
    "respond_with_job": "kiapi_core.jobs.respond",
    "typed_job": "kiapi_core.jobs.schemas",
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'kiapi_core' has no attribute {name!r}")
    module, _, attr = where.partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_MEDIA_TYPES",
    "ApiError",
    "Capability",
    "CheckFailed",
    "EnvSettings",
    "HealthCheck",
    "Host",
    "ImageGenerator",
    "ImageParamError",
    "ImageRequest",
    "JobCanceled",
    "JobContext",
    "JobFailed",
    "JobHandler",
    "JobInputError",
    "JsonRefused",
    "KeepAlive",
    "LoadOptions",
    "ModelSpec",
    "Operation",
    "PhaseClock",
    "Previews",
    "Schema",
    "Settings",
    "StepProgress",
    "WebhookEvents",
    "WebhookUrl",
    "Weights",
    "activation_command",
    "cached_fragment",
    "components_from",
    "decode_fraction",
    "describe_choices",
    "encode_image",
    "ensure_fast_blas",
    "error_response",
    "hookimpl",
    "host_of",
    "invalid",
    "json_response",
    "missing_weights",
    "optional",
    "parse_json_text",
    "phase_clock",
    "python_check",
    "read_json",
    "ref",
    "require_model",
    "resolve_model",
    "respond_with_job",
    "typed_job",
]
