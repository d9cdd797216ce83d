"""Which worker a celery job goes to (runtime/celery/routing.py): its model's holder, or the
shared queue when loading the model on a free worker starts it sooner than the holder's backlog.
Pure decisions on directory entries; tests/test_residency_routing.py runs them on a cluster."""

from __future__ import annotations

from typing import Any

from kiapi_core.jobs.store import JobRecord
from kiapi_core.runtime.celery.routing import choose_worker

KEY = "gen:m:"


def job(model: str = "m") -> JobRecord:
    return JobRecord("job_0123456789abcdef", "gen", "queued", {"model": model}, created_at=0.0)


def worker(
    node: str,
    running: int = 0,
    holds: bool = False,
    load_s: float = 30.0,
    run_s: float | None = 12.0,
    concurrency: int = 1,
) -> dict[str, Any]:
    rows = [{"key": "fam/m", "route_keys": [KEY], "load_s": load_s, "run_s": run_s}]
    return {
        "node": node,
        "queue": f"kiapi.w.{node}",
        "types": ["gen"],
        "concurrency": concurrency,
        "running": running,
        "resident": rows if holds else [],
    }


def test_a_free_holder_gets_the_job() -> None:
    assert choose_worker(job(), [worker("a", holds=True), worker("b")], {}) == "a"


def test_a_busy_holder_keeps_a_job_a_load_elsewhere_would_not_start_sooner() -> None:
    # Loads in 30 s, runs 12 s: behind one or two jobs the wait is shorter than the load.
    live = [worker("a", running=1, holds=True), worker("b")]
    assert choose_worker(job(), live, {}) == "a"
    assert choose_worker(job(), live, {"a": 1}) == "a"
    # Behind three (36 s) a free worker loading it (30 s) starts it sooner: the shared queue.
    assert choose_worker(job(), live, {"a": 2}) is None


def test_a_model_that_loads_in_no_time_never_leaves_a_worker_idle() -> None:
    live = [worker("a", running=1, holds=True, load_s=0.000001, run_s=0.0002), worker("b")]
    assert choose_worker(job(), live, {}) is None


def test_no_free_worker_or_no_use_time_yet_keeps_the_holder() -> None:
    busy = [worker("a", running=1, holds=True, load_s=0.0), worker("b", running=1)]
    assert choose_worker(job(), busy, {"a": 5}) == "a"
    routed_b = [worker("a", running=1, holds=True, load_s=0.0), worker("b")]
    assert choose_worker(job(), routed_b, {"a": 5, "b": 1}) == "a"  # b's slot is promised
    unknown = [worker("a", running=1, holds=True, run_s=None, load_s=0.0), worker("b")]
    assert choose_worker(job(), unknown, {"a": 5}) == "a"


def test_slots_divide_the_wait() -> None:
    # Two slots, four jobs there: (4 - 2 + 1) jobs at 12 s over 2 slots = 18 s < 30 s.
    live = [worker("a", running=2, holds=True, concurrency=2), worker("b")]
    assert choose_worker(job(), live, {"a": 2}) == "a"
    assert choose_worker(job(), live, {"a": 4}) == "a"  # 5 x 12 / 2 = 30 s: not sooner
    assert choose_worker(job(), live, {"a": 5}) is None  # 36 s


def test_every_or_no_worker_holding_it_is_the_shared_queue() -> None:
    assert choose_worker(job(), [worker("a"), worker("b")], {}) is None
    both = [worker("a", running=1, holds=True), worker("b", running=1, holds=True)]
    assert choose_worker(job(), both, {}) is None
