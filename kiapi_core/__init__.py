"""kiapi: a small, fast HTTP host for local AI models whose capabilities arrive as plugins.

The public plugin API: ``hookimpl`` (decorate hook functions, see ``kiapi_core.hookspecs``),
``Capability``, ``ModelSpec``/``Weights``; for routes ``kiapi_core.web.body.read_json``,
``kiapi_core.jobs.respond.respond_with_job``, ``kiapi_core.web.errors.ApiError``; for handlers
``kiapi_core.jobs.context.JobContext``.
"""

from kiapi_core.capabilities import Capability
from kiapi_core.hookspecs import hookimpl
from kiapi_core.models.spec import ModelSpec, Weights

__all__ = ["Capability", "ModelSpec", "Weights", "hookimpl"]
