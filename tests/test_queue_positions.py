"""queue_position stays the claim order (priority, then FIFO) in a deep queue, on both stores.

The SQLite store counts queued jobs per bucket of 512 seqs (kept by triggers) instead of
counting every job ahead; these tests walk a queue spanning several buckets through creates,
priority changes, cancels and claims, and compare every position a read or a listing shows
with the order the jobs are claimed in.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from kiapi_core.jobs.store import JobRecord, JobStore, SqliteJobStore
from kiapi_core.state.redis import RedisJobStore
from kiapi_core.state.sqlite import Database
from kiapi_core.testing.redis import RedisServer, redis_server_binary, start_redis

DEPTH = 1300  # three buckets of 512


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        db = Database(tmp_path / "kiapi.db")
        yield SqliteJobStore(db)
        db.close()
        return
    client = redis.Redis.from_url(
        request.getfixturevalue("redis_server").url, decode_responses=True
    )
    client.flushdb()
    yield RedisJobStore(client, "t")
    client.close()


def claim_order(jobs: dict[str, JobRecord]) -> list[str]:
    queued = [j for j in jobs.values() if j.status == "queued"]
    return [j.id for j in sorted(queued, key=lambda j: (-j.priority, j.seq))]


def claim_first(store: JobStore, job_id: str) -> None:
    if isinstance(store, RedisJobStore):
        _, job = store.claim(job_id, "w1/0", 30, 3)
    else:
        job = store.claim_next("w1/0")
    assert job is not None and job.id == job_id


def shown_positions(store: JobStore, ids: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Every queued job's position as GET shows it, and as a walk of ?status=queued shows it."""
    by_get = {i: j.queue_position for i in ids if (j := store.get(i)) and j.status == "queued"}
    by_list: dict[str, int] = {}
    cursor = None
    while True:
        page, cursor = store.list(status="queued", job_type=None, limit=97, cursor=cursor)
        by_list.update({j.id: j.queue_position for j in page if j.queue_position is not None})
        if cursor is None:
            break
    return by_get, by_list  # type: ignore[return-value]


def check(store: JobStore, jobs: dict[str, JobRecord]) -> None:
    order = claim_order(jobs)
    expected = {job_id: n + 1 for n, job_id in enumerate(order)}
    by_get, by_list = shown_positions(store, list(jobs))
    assert by_get == expected
    assert by_list == expected
    assert store.waiting_count() == len(order)


def test_positions_follow_the_claim_order_through_every_change(store: JobStore) -> None:
    rng = random.Random(7)
    jobs: dict[str, JobRecord] = {}
    for n in range(DEPTH):
        # Mostly the default priority (one long FIFO over several buckets), some above, some below.
        priority = rng.choice([0] * 8 + [3, -2])
        job = store.create("echo", {"n": n}, max_queue=DEPTH, priority=priority)
        assert job.queue_position is not None
        jobs[job.id] = job
    check(store, jobs)
    ids = list(jobs)
    for job_id in rng.sample(ids, 60):
        changed = store.set_priority(job_id, rng.choice([-1, 0, 5]))
        assert changed is not None
        jobs[job_id].priority = changed.priority
    for job_id in rng.sample(ids, 40):
        if jobs[job_id].status == "queued":
            store.cancel(job_id)
            jobs[job_id].status = "canceled"
    for _ in range(30):
        first = claim_order(jobs)[0]
        claim_first(store, first)
        jobs[first].status = "running"
    check(store, jobs)
    # Only the queue is counted: jobs that left it show no position.
    left = next(j for j in jobs.values() if j.status == "canceled")
    assert store.get(left.id).queue_position is None  # type: ignore[union-attr]


def test_a_full_queue_is_refused_by_the_bucket_count(store: JobStore) -> None:
    from kiapi_core.jobs.store import QueueFull

    for _ in range(3):
        store.create("echo", {}, max_queue=3)
    with pytest.raises(QueueFull):
        store.create("echo", {}, max_queue=3)


def test_a_database_without_bucket_counts_is_recounted_at_open(tmp_path: Path) -> None:
    """An older kiapi.db (no counts, or counts gone wrong) shows the right positions once opened."""
    path = tmp_path / "kiapi.db"
    db = Database(path)
    store = SqliteJobStore(db)
    jobs = {j.id: j for j in (store.create("echo", {}, max_queue=2000) for _ in range(600))}
    db.close()
    raw = sqlite3.connect(path)
    raw.executescript(
        "DROP TRIGGER queue_in; DROP TRIGGER queue_move; DROP TRIGGER queue_out;"
        " DROP TABLE queue_buckets;"
        " UPDATE jobs SET priority = 1 WHERE seq % 7 = 0;"
        " UPDATE jobs SET status = 'canceled' WHERE seq % 11 = 0;"
    )
    rows = raw.execute("SELECT id, priority, status FROM jobs").fetchall()
    raw.close()
    for job_id, priority, status in rows:
        jobs[job_id].priority, jobs[job_id].status = priority, status
    db = Database(path)
    try:
        check(SqliteJobStore(db), jobs)
    finally:
        db.close()


def test_a_read_sees_every_change_to_the_row_even_a_hand_edit(tmp_path: Path) -> None:
    """Reads reuse a decoded record only while its whole stored row is unchanged."""
    db = Database(tmp_path / "kiapi.db")
    try:
        store = SqliteJobStore(db)
        job = store.create("echo", {"text": "a"}, max_queue=10)
        first = store.get(job.id)
        assert first is not None and first.params == {"text": "a"}
        first.queue_position = 99  # what a caller sets on its copy stays on its copy
        assert store.get(job.id).queue_position == 1  # type: ignore[union-attr]
        raw = sqlite3.connect(tmp_path / "kiapi.db")
        with raw:  # no version bump: only the row's values differ
            raw.execute('UPDATE jobs SET params = \'{"text": "b"}\' WHERE id = ?', (job.id,))
        assert store.get(job.id).params == {"text": "b"}  # type: ignore[union-attr]
        with raw:
            raw.execute("UPDATE jobs SET params = 'not json' WHERE id = ?", (job.id,))
        damaged = store.get(job.id)
        assert damaged is not None and damaged.damage and damaged.params == {}
        raw.close()
        listed, _ = store.list(status=None, job_type=None, limit=5, cursor=None)
        assert listed[0].damage == damaged.damage
    finally:
        db.close()


def test_the_work_of_a_read_does_not_grow_with_the_depth_of_the_queue(tmp_path: Path) -> None:
    """SQLite's own instruction count for a job read and a page, at depths 300 and 3,000.

    A COUNT of the jobs ahead (the old position) did ~10x the work at 10x the depth.
    """
    db = Database(tmp_path / "kiapi.db")
    store = SqliteJobStore(db)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    def work(read: Callable[[], object]) -> int:
        nonlocal steps
        steps = 0
        db.connect().set_progress_handler(count, 10)
        try:
            read()
        finally:
            db.connect().set_progress_handler(None, 0)
        return steps

    try:
        measured = {}
        for depth in (300, 3000):
            last = None
            while store.waiting_count() < depth:
                last = store.create("echo", {}, max_queue=depth)
            assert last is not None
            job_id = last.id
            measured[depth] = (
                work(lambda: store.get(job_id)),  # noqa: B023 (called at once)
                work(lambda: store.list(status="queued", job_type=None, limit=50, cursor=None)),
            )
        (get_small, list_small), (get_deep, list_deep) = measured[300], measured[3000]
        assert get_deep <= 2 * get_small + 20, measured
        assert list_deep <= 2 * list_small + 20, measured
    finally:
        db.close()
