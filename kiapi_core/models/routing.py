"""A job's routing key: which resident model it will want, read off its params.

``{type}:{model}:{quantize}`` from the params' ``model`` and ``quantize`` (empty when absent).
It needs no plugin code: a worker learns the keys of the jobs each resident model served
(``JobUse.route_key``) and advertises them; a dispatcher sends a job whose key a worker holds to
that worker (docs/scale-out.md, residency-aware routing). A ``kiapi.load`` job names the keys
it warms for (``load_route_keys``), ``*`` standing for any ``quantize``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

LOAD_JOB = "kiapi.load"
ANY = "*"


def route_key(job_type: str, params: Mapping[str, Any]) -> str:
    model = params.get("model")
    quantize = params.get("quantize")
    return f"{job_type}:{'' if model is None else model}:{'' if quantize is None else quantize}"


def route_keys_of(job_type: str, params: Mapping[str, Any]) -> tuple[str, ...]:
    """The keys a job's model use is recorded under: a load job's own list, else its key."""
    if job_type == LOAD_JOB:
        return tuple(str(k) for k in params.get("route_keys") or ())
    return (route_key(job_type, params),)


def load_route_keys(job_types: Iterable[str], names: Iterable[str]) -> list[str]:
    """What a model loaded ahead serves: every job type of its plugin, any of its names."""
    names = list(names)
    return [f"{t}:{n}:{ANY}" for t in job_types for n in names]


def held_by(key: str, held: Iterable[str]) -> bool:
    """Whether a worker advertising ``held`` has the model the job of ``key`` wants."""
    held = set(held)
    if key in held:
        return True
    job_type, model, _ = key.split(":", 2)
    return f"{job_type}:{model}:{ANY}" in held


def model_id(row: Mapping[str, Any]) -> str:
    """The ``family/name`` of a ``ModelManager.status()`` row (its key without options)."""
    return str(row.get("key", "")).split("[")[0]
