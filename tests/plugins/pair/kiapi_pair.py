"""kiapi-pair: two fake models (``pair/pair-a``, ``pair/pair-b``) that load in
KIAPI_PAIR_LOAD_S seconds (default 0.3) and one operation using either, through the real
``ModelManager``: residency (keep_alive, load/unload) and residency-aware routing tests and
``bench/scaleout.py``."""

from __future__ import annotations

import os
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from kiapi_core import (
    Capability,
    JobContext,
    ModelSpec,
    Operation,
    hookimpl,
    host_of,
    require_model,
)

CAPABILITY = Capability(
    name="pair", domain="text", title="Pair", description="Two fake models, for tests."
)


class PairRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="pair-a (default) or pair-b.")
    steps: int = Field(2, ge=1, le=1000, description="Progress steps.")
    delay_s: float = Field(0.01, ge=0, le=60, description="Pause per step, in seconds.")
    keep_alive: float | None = Field(None, description="Seconds the model stays loaded; 0, -1.")
    mode: Literal["sync", "async"] = Field("sync", description="Wait for the result, or 202.")


class PairResult(BaseModel):
    model: str
    loaded: bool = Field(description="This job loaded the model (it was not resident).")
    pid: int


class FakeModel:
    def __init__(self, name: str) -> None:
        self.name = name


def _loader(name: str) -> Any:
    def load(weights_dir: Any, options: Any) -> FakeModel:
        time.sleep(float(os.environ.get("KIAPI_PAIR_LOAD_S", "0.3")))
        return FakeModel(name)

    return load


SPECS = [
    ModelSpec(
        name=name,
        family="pair",
        domain="text",
        load=_loader(name),
        default=name == "pair-a",
        memory_gb=float(os.environ.get("KIAPI_PAIR_MEMORY_GB", "0.01")),
    )
    for name in ("pair-a", "pair-b")
]


def run_pair(ctx: JobContext) -> PairResult:
    spec = next(s for s in SPECS if s.name == ctx.params["model"])
    before = ctx.models.load_counts[spec.key]
    ctx.progress(0.0, "loading")
    with ctx.models.use(spec):
        loaded = ctx.models.load_counts[spec.key] > before
        for step in range(ctx.params["steps"]):
            time.sleep(ctx.params["delay_s"])
            ctx.progress((step + 1) / ctx.params["steps"], f"step {step + 1}")
    return PairResult(model=spec.name, loaded=loaded, pid=os.getpid())


def prepare(body: PairRequest, request: Request) -> dict[str, Any]:
    spec = require_model(host_of(request).registry.models_for("pair"), body.model, "pair")
    return {"model": spec.name, "steps": body.steps, "delay_s": body.delay_s}


@hookimpl
def register_capabilities(register: Any) -> None:
    register(CAPABILITY)


@hookimpl
def register_models(register: Any) -> None:
    for spec in SPECS:
        register(spec)


@hookimpl
def register_operations(register: Any) -> None:
    register(
        Operation(CAPABILITY, "run", PairRequest, run_pair, prepare=prepare, summary="Use a model")
    )
