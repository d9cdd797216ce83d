"""The model manager: warm residents, transient loads, the memory budget, idle TTL, weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kiapi_core.models.manager import JobUse, ModelManager, ModelUnavailable, job_scope
from kiapi_core.models.spec import ModelSpec, Weights, resolve_model
from kiapi_core.models.weights import WeightsRegistry

loaded: list[str] = []
freed: list[str] = []


def spec(name: str, memory: float, priority: int = 0, weights: Weights | None = None) -> ModelSpec:
    def load(weights_dir: Path | None, options: Any) -> dict[str, Any]:
        loaded.append(name)
        return {"name": name, "options": dict(options), "dir": weights_dir}

    return ModelSpec(
        name=name,
        family="fake",
        domain="test",
        load=load,
        memory_gb=memory,
        priority=priority,
        unload=lambda obj: freed.append(obj["name"]),
        weights=weights,
    )


@pytest.fixture
def manager(tmp_path: Path) -> ModelManager:
    loaded.clear()
    freed.clear()
    return ModelManager(limit_gb=10, idle_ttl_s=60, weights=WeightsRegistry(tmp_path))


def test_a_model_loads_once_and_stays_warm(manager: ModelManager) -> None:
    a = spec("a", 2)
    for _ in range(5):
        with manager.use(a) as obj:
            assert obj["name"] == "a"
    assert loaded == ["a"]
    assert manager.load_counts["fake/a"] == 1
    assert manager.summary()["resident"] == 1


def test_transient_is_freed_and_the_resident_stays(manager: ModelManager) -> None:
    a = spec("a", 2)
    with manager.use(a):
        pass
    with manager.use(a, {"quantize": 4}, transient=True) as obj:
        assert obj["options"] == {"quantize": 4}
        assert manager.summary()["transient"] == 1
        assert manager.used_gb() == 4
    assert freed == ["a"]
    assert manager.summary() == {
        "resident": 1,
        "transient": 0,
        "loading": 0,
        "memory_gb_used": 2,
        "memory_gb_limit": 10,
    }
    assert manager.transient_counts["fake/a"] == 1 and manager.load_counts["fake/a"] == 1


def test_budget_evicts_idle_models_least_recently_used_first(manager: ModelManager) -> None:
    a, b, c = spec("a", 4), spec("b", 4), spec("c", 4)
    with manager.use(a):
        pass
    with manager.use(b):
        pass
    with manager.use(a):  # a is now the most recently used
        pass
    with manager.use(c):
        pass
    assert freed == ["b"]
    assert {r["model"] for r in manager.status()} == {"a", "c"}


def test_priority_keeps_a_model_resident_longer(manager: ModelManager) -> None:
    keep, other, new = spec("keep", 4, priority=10), spec("other", 4), spec("new", 4)
    with manager.use(other):
        pass
    with manager.use(keep):
        pass
    with manager.use(new):
        pass
    assert freed == ["other"]


def test_a_model_larger_than_the_budget_is_refused_with_the_setting(manager: ModelManager) -> None:
    with (
        pytest.raises(ModelUnavailable, match="KIAPI_MEMORY_LIMIT_GB"),
        manager.use(spec("huge", 11)),
    ):
        pass
    assert loaded == []


def test_models_in_use_are_never_evicted(manager: ModelManager) -> None:
    with (
        manager.use(spec("a", 6)),
        pytest.raises(ModelUnavailable, match="in use"),
        manager.use(spec("b", 6)),
    ):
        pass
    assert freed == []


def test_the_budget_counts_real_resident_memory_not_only_estimates(tmp_path: Path) -> None:
    """Models that take four times their estimate: the budget reads the resident set."""
    loaded.clear()
    freed.clear()
    gb = 1024**3

    def rss() -> int:
        resident = [name for name in loaded if name not in freed]
        return int((0.5 + sum(4 * 2 for _ in resident)) * gb)

    manager = ModelManager(limit_gb=10, idle_ttl_s=60, weights=WeightsRegistry(tmp_path), rss=rss)
    with manager.use(spec("a", 2)):
        pass
    # On paper 2 + 2 GB fit in 10; really 8.5 GB are resident, so a makes room for b.
    with manager.use(spec("b", 2)):
        pass
    assert freed == ["a"] and manager.used_gb() == 2
    # b in use holds 8.5 GB for real: c (2 GB) does not fit next to it, and says why.
    with (
        manager.use(spec("b", 2)),
        pytest.raises(ModelUnavailable, match=r"holds 8\.50 GB \(resident.*KIAPI_MEMORY_LIMIT_GB"),
        manager.use(spec("c", 2)),
    ):
        pass


def test_idle_ttl_unloads(manager: ModelManager) -> None:
    import time

    with manager.use(spec("a", 1)):
        pass
    assert manager.sweep_idle(now=time.monotonic() + 30) == []
    assert manager.sweep_idle(now=time.monotonic() + 61) == ["fake/a"]
    assert freed == ["a"] and manager.status() == []
    with manager.use(spec("a", 1)):
        pass
    assert manager.load_counts["fake/a"] == 2


def test_missing_weights_name_the_command(manager: ModelManager, tmp_path: Path) -> None:
    weights = Weights(source="org/repo", download=lambda: tmp_path, validate=lambda p: None)
    gated = spec("gated", 1, weights=weights)
    with pytest.raises(ModelUnavailable, match="kiapi activate fake"), manager.use(gated):
        pass
    manager.weights.activate(gated, tmp_path, "path")
    with manager.use(gated) as obj:
        assert obj["dir"] == tmp_path
    assert manager.weights.deactivate(gated) is True
    assert manager.weights.path_for(gated) is None


def test_resolve_model_by_name_alias_and_default() -> None:
    a = ModelSpec(name="a", family="f", domain="d", load=lambda *_: None, aliases=("alpha",))
    b = ModelSpec(name="b", family="f", domain="d", load=lambda *_: None, default=True)
    assert resolve_model([a, b], None) is b
    assert resolve_model([a, b], "ALPHA") is a
    assert resolve_model([a, b], "c") is None


def test_require_model_refuses_an_unknown_one_naming_the_valid_ones() -> None:
    from kiapi_core import ApiError, require_model

    a = ModelSpec(name="a", family="f", domain="d", load=lambda *_: None, aliases=("alpha",))
    b = ModelSpec(name="b", family="f", domain="d", load=lambda *_: None, default=True)
    assert require_model([a, b], "alpha", "cap") is a and require_model([a, b], None, "cap") is b
    with pytest.raises(ApiError) as caught:
        require_model([a, b], "sdxl", "cap")
    assert caught.value.status == 400
    assert caught.value.detail == "unknown model 'sdxl' for cap; valid: a (aliases: alpha); b"
    assert caught.value.extra["valid_models"] == [
        {"name": "a", "aliases": ["alpha"], "default": False},
        {"name": "b", "aliases": [], "default": True},
    ]
    with pytest.raises(ApiError, match="valid: none"):
        require_model([], None, "cap")


def test_a_resident_shows_its_load_time_and_typical_use(manager: ModelManager) -> None:
    """What a celery dispatcher weighs before loading a model on a free worker."""
    import time

    slow = ModelSpec(
        name="slow", family="fake", domain="test", memory_gb=1, load=lambda d, o: time.sleep(0.05)
    )
    with manager.use(slow):
        (row,) = manager.status()
        assert row["load_s"] >= 0.05 and row["run_s"] is None  # no use ended yet
        time.sleep(0.1)
    (row,) = manager.status()
    first = row["run_s"]
    assert 0.1 <= first < 0.5
    with manager.use(slow):
        pass  # a short use moves the average, one odd use does not make it
    (row,) = manager.status()
    assert 0.5 * first < row["run_s"] < first
    assert row["load_s"] >= 0.05  # not loaded again
    # A kiapi.load job's use is no job's: it leaves the typical use alone.
    with job_scope(JobUse(timed=False)), manager.use(slow):
        pass
    assert manager.status()[0]["run_s"] == row["run_s"]
