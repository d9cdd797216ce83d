"""The celery backend's state in a real Redis, in process: the job store, file metadata, events.

The end-to-end tests with real API and worker processes are in test_scaleout.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import run_cli

from kiapi_core.files.store import FileMeta, FileStore
from kiapi_core.ids import new_job_id
from kiapi_core.jobs.context import artifact_file_id
from kiapi_core.jobs.store import IdempotencyKey, JobStore, NotStrictJson, QueueFull
from kiapi_core.models.spec import ModelSpec, Weights
from kiapi_core.state.redis import (
    ClusterWeights,
    RedisFileMeta,
    RedisJobStore,
    WorkerDirectory,
    job_from_event,
)
from kiapi_core.testing.redis import RedisServer, start_redis


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_server.url, decode_responses=True)
    c.flushdb()
    yield c
    c.close()


@pytest.fixture
def store(client: redis.Redis) -> RedisJobStore:
    return RedisJobStore(client, "t")


@pytest.fixture
def files(client: redis.Redis, tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "shared", RedisFileMeta(client, "t"), orphan_grace_s=3600)


def test_the_redis_stores_implement_the_seams(store: RedisJobStore, client: redis.Redis) -> None:
    assert isinstance(store, JobStore)
    assert isinstance(RedisFileMeta(client, "t"), FileMeta)


# -- jobs ---------------------------------------------------------------------------------------
def test_create_get_list_and_queue_positions(store: RedisJobStore) -> None:
    jobs = [store.create("echo" if i % 2 else "other", {"i": i}, max_queue=10) for i in range(5)]
    assert [j.queue_position for j in jobs] == [1, 2, 3, 4, 5]
    got = store.get(jobs[2].id)
    assert got is not None and got.params == {"i": 2} and got.status == "queued"
    assert got.queue_position == 3 and got.created_at == pytest.approx(time.time(), abs=5)
    assert store.get("job_0000000000000000") is None and store.get("../etc") is None
    assert store.waiting_count() == 5

    page, cursor = store.list(status=None, job_type=None, limit=2, cursor=None)
    assert [j.id for j in page] == [jobs[4].id, jobs[3].id] and cursor is not None
    rest, end = store.list(status=None, job_type=None, limit=10, cursor=cursor)
    assert [j.id for j in rest] == [jobs[2].id, jobs[1].id, jobs[0].id] and end is None
    echo, _ = store.list(status="queued", job_type="echo", limit=10, cursor=None)
    assert [j.id for j in echo] == [jobs[3].id, jobs[1].id]
    assert store.list(status="running", job_type=None, limit=10, cursor=None) == ([], None)

    with pytest.raises(QueueFull) as full:
        store.create("echo", {}, max_queue=5)
    assert full.value.waiting == 5


def test_claim_renew_finish_and_ownership(store: RedisJobStore) -> None:
    job = store.create("echo", {}, max_queue=10)
    behind = store.create("echo", {}, max_queue=10)
    outcome, claimed = store.claim(job.id, "w1/0", lease_s=30, max_attempts=3)
    assert outcome == "claimed" and claimed is not None
    assert claimed.status == "running" and claimed.worker == "w1/0#1" and claimed.attempt == 1
    assert store.get(behind.id).queue_position == 1  # type: ignore[union-attr]
    # A second delivery of the same message while the lease is live is still a turn: it runs
    # the next queued job; with none left, it is dropped.
    outcome, next_up = store.claim(job.id, "w2/0", lease_s=30, max_attempts=3)
    assert outcome == "claimed" and next_up is not None and next_up.id == behind.id
    assert store.claim(job.id, "w2/0", lease_s=30, max_attempts=3) == ("busy", None)
    assert store.finish(behind.id, "succeeded", worker="w2/0#1", result={}, artifacts=[])
    assert [j.id for j in store.running()] == [job.id]

    store.set_progress(job.id, 0.5, "step 1/2", eta_at=1234.5)
    store.set_progress(job.id, None, "saving")
    now = store.get(job.id)
    assert now is not None and now.progress == 0.5 and now.progress_label == "saving"
    assert now.eta_at == 1234.5  # kept until the next estimate

    assert store.renew({job.id: "w1/0#1"}, 30) == set()
    assert store.renew({job.id: "w2/0#1"}, 30) == {job.id}
    assert not store.finish(job.id, "succeeded", worker="w2/0#1", result={}, artifacts=[])
    assert store.finish(job.id, "succeeded", worker="w1/0#1", result={"ok": 1}, artifacts=["a"])
    done = store.get(job.id)
    assert done is not None and done.status == "succeeded" and done.progress == 1.0
    assert done.result == {"ok": 1} and done.artifacts == ["a"] and done.progress_label == "done"
    assert done.finished_at is not None and done.started_at is not None
    # A message is a turn to run a job of its type: one naming a finished job runs the next
    # queued one (whose own message, later, finds nothing left).
    third = store.create("echo", {}, max_queue=10)
    outcome, next_up = store.claim(job.id, "w1/0", 30, 3)
    assert outcome == "claimed" and next_up is not None and next_up.id == third.id
    assert store.finish(third.id, "succeeded", worker="w1/0#1", result={}, artifacts=[])
    assert store.claim(third.id, "w1/0", 30, 3) == ("done", None)
    assert store.claim(job.id, "w1/0", 30, 3) == ("done", None)
    assert store.claim("job_00000000000000ff", "w1/0", 30, 3) == ("missing", None)
    assert store.recent_duration_s("echo") is not None
    assert store.running() == [] and store.recover() == []


def test_only_strict_json_is_written_and_a_damaged_hash_still_reads(
    store: RedisJobStore, client: redis.Redis
) -> None:
    with pytest.raises(NotStrictJson, match="params"):
        store.create("echo", {"weight": float("inf")}, max_queue=10)
    job = store.create("echo", {"text": "x"}, max_queue=10)
    store.claim(job.id, "w1/0", lease_s=30, max_attempts=3)
    with pytest.raises(NotStrictJson, match="progress"):
        store.set_progress(job.id, float("nan"), "lost")
    with pytest.raises(NotStrictJson, match="eta_at"):
        store.set_progress(job.id, 0.5, "lost", eta_at=float("inf"))
    with pytest.raises(NotStrictJson, match="result"):
        store.finish(job.id, "succeeded", worker="w1/0#1", result={"score": float("nan")})
    assert store.get(job.id).status == "running"  # type: ignore[union-attr]
    # Written by hand (or by an older version): each read names the damage, the list goes on.
    good = store.create("echo", {"text": "fine"}, max_queue=10)
    client.hset(f"t:job:{job.id}", mapping={"params": '{"w": NaN}', "progress": "inf"})
    damaged = store.get(job.id)
    assert damaged is not None and damaged.damage and damaged.params == {}
    assert "params" in damaged.error and "progress" in damaged.error  # type: ignore[operator]
    page, _ = store.list(status=None, job_type=None, limit=10, cursor=None)
    assert [j.id for j in page] == [good.id, job.id] and page[0].damage is None
    json.dumps([j.to_json() for j in page], allow_nan=False)


def test_a_lapsed_lease_is_taken_over_and_the_old_owner_is_locked_out(
    store: RedisJobStore,
) -> None:
    job = store.create("echo", {}, max_queue=10)
    store.claim(job.id, "w1/0", lease_s=0.2, max_attempts=3)
    time.sleep(0.3)
    outcome, again = store.claim(job.id, "w2/0", lease_s=30, max_attempts=3)
    assert outcome == "claimed" and again is not None
    assert again.attempt == 2 and again.worker == "w2/0#2" and again.progress is None
    # The first worker (cut off, not dead) can neither renew nor finish any more.
    assert store.renew({job.id: "w1/0#1"}, 30) == {job.id}
    assert not store.finish(job.id, "succeeded", worker="w1/0#1")
    assert store.finish(job.id, "succeeded", worker="w2/0#2")


def test_the_sweeper_requeues_lapsed_jobs_then_gives_up(store: RedisJobStore) -> None:
    job = store.create("echo", {}, max_queue=10)
    for attempt in (1, 2):
        store.claim(job.id, f"w{attempt}/0", lease_s=0.1, max_attempts=2)
        time.sleep(0.2)
        lapsed = store.requeue_lapsed(max_attempts=2)
        if attempt == 1:
            assert lapsed == [(job.id, "echo", "queued")]
            back = store.get(job.id)
            assert back is not None and back.status == "queued" and back.worker is None
            assert back.queue_position == 1 and back.attempt == 1
            assert [j.id for j in store.undispatched(older_than_s=0)] == [job.id]
            store.mark_dispatched(job.id)
            assert store.undispatched(older_than_s=0) == []
    assert lapsed == [(job.id, "echo", "failed")]
    failed = store.get(job.id)
    assert failed is not None and failed.status == "failed"
    assert failed.error_kind == "interrupted" and "KIAPI_MAX_ATTEMPTS=2" in (failed.error or "")


def test_cancel_queued_and_running_and_a_canceled_job_whose_worker_died(
    store: RedisJobStore,
) -> None:
    queued = store.create("echo", {}, max_queue=10)
    canceled = store.cancel(queued.id)
    assert canceled is not None and canceled.status == "canceled"
    assert canceled.error == "canceled by request" and store.waiting_count() == 0
    assert store.cancel("job_00000000000000ff") is None

    running = store.create("echo", {}, max_queue=10)
    store.claim(running.id, "w1/0", lease_s=0.1, max_attempts=3)
    flagged = store.cancel(running.id)
    assert flagged is not None and flagged.status == "running" and flagged.cancel_requested
    assert store.cancel_requested(running.id)
    time.sleep(0.2)
    # Its worker is gone: the job ends canceled rather than running again.
    assert store.requeue_lapsed(max_attempts=3) == [(running.id, "echo", "canceled")]
    assert store.get(running.id).status == "canceled"  # type: ignore[union-attr]


def test_every_change_is_published_with_the_new_state(
    store: RedisJobStore, client: redis.Redis
) -> None:
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("t:events")
    job = store.create("echo", {"x": 1}, max_queue=10)
    store.claim(job.id, "w1/0", 30, 3)
    store.set_progress(job.id, 0.25, "step 1/4")
    store.finish(job.id, "succeeded", worker="w1/0#1", result={}, artifacts=[])
    seen = []
    deadline = time.monotonic() + 5
    while len(seen) < 5 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message is not None:
            seen.append(job_from_event(message["data"]))
    pubsub.close()
    assert seen[2] == ("", None)  # the claim moved the queue
    states = [(j.status, j.progress, j.progress_label) for _, j in seen if j is not None]
    assert states == [
        ("queued", None, "queued"),
        ("running", None, "running"),
        ("running", 0.25, "step 1/4"),
        ("succeeded", 1.0, "done"),
    ]
    versions = [j.version for _, j in seen if j is not None]
    assert versions == sorted(versions) and len(set(versions)) == 4
    # The journal holds the same changes, in order, with increasing stream ids.
    entries = store.events_after(None, job_id=job.id)
    assert [e.status for e in entries] == ["queued", "running", "running", "succeeded"]
    assert store.last_event_id(job.id) == entries[-1].id == store.event_bounds()[1]


def test_one_jobs_entries_are_read_between_its_first_and_newest(
    store: RedisJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    early = store.create("echo", {}, max_queue=10)
    store.claim(early.id, "w1/0", 30, 3)
    store.set_progress(early.id, 0.5, "half")
    for _ in range(30):  # other jobs' changes after it: a resume must not read them
        store.create("echo", {}, max_queue=1000)
    store.set_progress(early.id, 0.75, "more")
    for _ in range(30):
        store.create("echo", {}, max_queue=1000)
    reads: list[tuple[str, str]] = []
    xrange = store.r.xrange

    def recording(name: str, start: str, end: str, count: int | None = None) -> Any:
        reads.append((start, end))
        return xrange(name, start, end, count=count)

    monkeypatch.setattr(store.r, "xrange", recording)
    entries = store.events_after(None, job_id=early.id)
    assert [e.job_id for e in entries] == [early.id] * 4
    labels = [json.loads(e.data)["progress_label"] for e in entries]
    assert labels == ["queued", "running", "half", "more"]
    assert reads == [(entries[0].id, entries[-1].id)]
    reads.clear()
    # From an old id (another job's, before this one was created): still its own stretch.
    assert store.events_after("0-1", job_id=early.id) == entries
    assert reads == [(entries[0].id, entries[-1].id)]
    reads.clear()
    assert store.events_after(entries[0].id, job_id=early.id) == entries[1:]
    assert reads == [(f"({entries[0].id}", entries[-1].id)]
    reads.clear()
    # Nothing newer than what the follower saw: no read of the stream at all.
    assert store.events_after(entries[-1].id, job_id=early.id) == []
    assert store.events_after(None, job_id="job_" + "0" * 16) == []
    assert reads == []


# -- files ----------------------------------------------------------------------------------------
def test_file_records_in_redis(files: FileStore) -> None:
    job_id = new_job_id()
    upload = files.put_bytes(b"upload", filename="a.txt", content_type="text/plain")
    first = artifact_file_id(job_id, 1, 0)
    art = files.put_bytes(
        b"v1", filename="o.txt", content_type="text/plain", job_id=job_id, file_id=first
    )
    assert art.id == first and files.get(first) == art
    # The same id again replaces the file: one record, new bytes.
    again = files.put_bytes(
        b"v2!", filename="o.txt", content_type="text/plain", job_id=job_id, file_id=first
    )
    assert files.get(first) == again and again.bytes == 3
    assert files.blob_path(again).read_bytes() == b"v2!"
    assert [f.id for f in files.list(job_id=job_id)[0]] == [first]
    page, cursor = files.list(limit=1)
    assert [f.id for f in page] == [first] and cursor is not None
    assert [f.id for f in files.list(limit=5, cursor=cursor)[0]] == [upload.id]

    second = files.put_bytes(
        b"x",
        filename="p",
        content_type="a/b",
        job_id=job_id,
        file_id=artifact_file_id(job_id, 1, 1),
    )
    assert files.delete_for_job(job_id, keep=[first]) == 1
    assert files.get(second.id) is None and files.get(first) is not None
    assert files.delete(first) and not files.delete(first)
    assert not (files.blobs / first).exists()
    assert files.sweep_expired(60, now=time.time() + 120) == 1
    assert files.list() == ([], None)


def test_shared_dir_cleanup_spares_what_other_nodes_are_writing(files: FileStore) -> None:
    kept = files.put_bytes(b"kept", filename="k", content_type="a/b")
    (files.tmp / "tmpnow.part").write_bytes(b"being written by another node")
    (files.blobs / "file_00000000000000aa").write_bytes(b"renamed, record coming")
    old = files.tmp / "tmpold.part"
    old.write_bytes(b"left by a dead node")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert files.remove_orphans() == 1
    assert sorted(p.name for p in files.tmp.iterdir()) == ["tmpnow.part"]
    assert sorted(p.name for p in files.blobs.iterdir()) == sorted(
        ["file_00000000000000aa", kept.id]
    )


def test_an_api_node_sees_the_weights_its_workers_have(client: redis.Redis, tmp_path: Path) -> None:
    spec = ModelSpec(
        name="m",
        family="fam",
        domain="image",
        load=lambda *_: None,
        weights=Weights(source="x", download=lambda: tmp_path, validate=lambda _: None),
    )
    directory = WorkerDirectory(client, "t")
    weights = ClusterWeights(tmp_path / "api-home", directory)
    assert weights.path_for(spec) is None
    directory.announce("w1@h", {"models": {"fam/m": "/models/m"}}, ttl_s=5)
    weights._cached = (0.0, {})
    assert weights.path_for(spec) == Path("/models/m")
    directory.withdraw("w1@h")
    weights._cached = (0.0, {})
    assert weights.path_for(spec) is None


def test_the_worker_directory_reads_live_workers_and_a_hash_in_one_trip(
    client: redis.Redis,
) -> None:
    directory = WorkerDirectory(client, "dir")
    directory.announce("w2@h", {"node": "w2@h"}, ttl_s=5)
    directory.announce("w1@h", {"node": "w1@h"}, ttl_s=5)
    client.sadd("dir:workers", "gone@h")  # its entry expired: the worker is lost
    client.hset("dir:backlog", mapping={"w1@h": 3})
    WorkerDirectory(client, "warm").live()  # the script is loaded once per Redis, then called
    with _round_trips(client) as trips:
        live, backlog = directory.live_with("dir:backlog")
    assert [w["node"] for w in live] == ["w1@h", "w2@h"] and backlog == {"w1@h": "3"}
    assert len(trips) == 1
    assert client.smembers("dir:workers") == {"w1@h", "w2@h"}
    assert directory.live() == live and directory.live_with() == (live, {})
    directory.withdraw("w1@h")
    directory.withdraw("w2@h")
    assert directory.live_with("dir:backlog") == ([], {"w1@h": "3"})


@contextlib.contextmanager
def _round_trips(client: redis.Redis) -> Iterator[list[object]]:
    """The commands ``client`` sends while the block runs (a pipeline or a script is one)."""
    sent: list[object] = []
    pool = client.connection_pool
    real = pool.get_connection

    def counted(*args: Any, **kwargs: Any) -> Any:
        sent.append(args)
        return real(*args, **kwargs)

    pool.get_connection = counted  # type: ignore[method-assign]
    try:
        yield sent
    finally:
        pool.get_connection = real  # type: ignore[method-assign]


# -- the embedded default stays light -------------------------------------------------------------
_EMBEDDED = """
import json, sys
from starlette.testclient import TestClient
from kiapi_core.app import create_app
from kiapi_core.cli import cli
with TestClient(create_app()) as c:
    job = c.post("/v1/text/echo/run", json={"text": "x", "steps": 1, "delay_s": 0},
                 headers={"Accept": "application/json"}).json()
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"celery", "kombu", "redis"})
print(json.dumps({"status": job["status"], "heavy": heavy}))
"""


def test_the_embedded_default_imports_no_celery_or_redis(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _EMBEDDED],
        env={**os.environ, "KIAPI_HOME": str(tmp_path), "KIAPI_PLUGINS": "echo"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"status": "succeeded", "heavy": []}


# -- settings and the command line ----------------------------------------------------------------
def test_the_celery_backend_needs_a_redis_url() -> None:
    result = run_cli("config", env={"KIAPI_BACKEND": "celery"})
    assert result.returncode != 0 and "KIAPI_REDIS_URL" in result.stderr
    result = run_cli("worker", env={"KIAPI_PLUGINS": "echo"})
    assert result.returncode != 0 and "KIAPI_REDIS_URL" in result.stderr


def test_a_worker_refuses_a_queue_whose_model_is_not_active(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    env = {
        "KIAPI_HOME": str(tmp_path),
        "KIAPI_REDIS_URL": redis_server.url,
        "KIAPI_PLUGINS": "echo,ideogram4",
        "HF_HUB_OFFLINE": "1",
    }
    result = run_cli("worker", "--queues", "echo,ideogram4", env=env)
    assert result.returncode != 0
    assert "ideogram4: no active model; run: kiapi activate ideogram4" in result.stderr
    result = run_cli("worker", "-Q", "nope", env=env)
    assert result.returncode != 0 and "nope: no such job type here" in result.stderr
    help_text = run_cli("worker", "--help").stdout
    assert "--concurrency" in help_text and "--queues" in help_text


def test_an_api_node_whose_redis_is_down_answers_503(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from kiapi_core.app import create_app
    from kiapi_core.settings import Settings
    from kiapi_core.testing import free_port

    settings = Settings(
        home=tmp_path,
        backend="celery",
        plugins=["echo"],
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
    )
    with TestClient(create_app(settings)) as c:  # it starts all the same
        for method, path, body in [
            ("GET", "/v1/jobs", None),
            ("GET", "/v1/jobs/job_0000000000000000", None),
            ("POST", "/v1/text/echo/run", {"text": "x", "mode": "async"}),
            ("GET", "/v1/files", None),
            ("GET", "/health", None),
        ]:
            r = c.request(method, path, json=body)
            assert r.status_code == 503, (path, r.text)
            assert r.headers["retry-after"] == "5" and "KIAPI_REDIS_URL" in r.json()["detail"]


def test_the_sweeper_resends_lost_and_unsent_jobs_one_node_at_a_time(
    store: RedisJobStore, files: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiapi_core.runtime.celery import dispatcher as celery_app
    from kiapi_core.settings import Settings

    class Broker:
        def __init__(self) -> None:
            self.sent: list[tuple[str, str]] = []

        def send_task(self, name: str, args: list[str], queue: str, **_: object) -> None:
            assert name == celery_app.TASK
            self.sent.append((args[0], queue))

    monkeypatch.setattr(celery_app, "UNDISPATCHED_GRACE_S", 0.0)
    settings = Settings(redis_prefix="t", job_lease_s=0.3, max_attempts=3)
    broker = Broker()
    one = celery_app.Sweeper(settings, store, files, broker, "api-1")  # type: ignore[arg-type]
    two = celery_app.Sweeper(settings, store, files, broker, "api-2")  # type: ignore[arg-type]

    unsent = store.create("echo", {}, max_queue=10)  # its API node died before sending it
    lost = store.create("other", {}, max_queue=10)
    store.mark_dispatched(lost.id)
    store.claim(lost.id, "w1/0", lease_s=0.1, max_attempts=3)
    left = files.put_bytes(
        b"half",
        filename="h",
        content_type="a/b",
        job_id=lost.id,
        file_id=artifact_file_id(lost.id, 1, 0),
    )
    time.sleep(0.2)
    one.sweep()
    two.sweep()  # same round: the lock keeps it out
    assert sorted(broker.sent) == sorted([(unsent.id, "echo"), (lost.id, "other")])
    assert store.get(lost.id).status == "queued"  # type: ignore[union-attr]
    assert store.undispatched(older_than_s=0) == []
    # The next run of ``lost`` deletes what the lost run left; here it is still there.
    assert files.get(left.id) is not None


# -- what both stores keep for the host's job rules (issue 15) ---------------------------------
@pytest.fixture(params=["sqlite", "redis"])
def either_store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    if request.param == "sqlite":
        from kiapi_core.jobs.store import SqliteJobStore
        from kiapi_core.state.sqlite import Database

        return SqliteJobStore(Database(tmp_path / "kiapi.db"))
    return RedisJobStore(request.getfixturevalue("client"), "t")


def _claim(store: JobStore, job_id: str) -> str:
    if isinstance(store, RedisJobStore):
        _, job = store.claim(job_id, "w1/0", 30, 3)
    else:
        job = store.claim_next("w1/0")
    assert job is not None and job.id == job_id
    return job.worker or ""


def test_a_jobs_chosen_status_and_declared_file_type_are_stored(either_store: JobStore) -> None:
    job = either_store.create("echo", {}, max_queue=10, artifact_type="text/plain")
    assert either_store.get(job.id).artifact_type == "text/plain"  # type: ignore[union-attr]
    worker = _claim(either_store, job.id)
    either_store.finish(
        job.id,
        "failed",
        worker=worker,
        result={"detail": "no card"},
        error="no card",
        error_kind="http_error",
        error_status=404,
    )
    done = either_store.get(job.id)
    assert done is not None and done.error_status == 404 and done.error_kind == "http_error"
    assert done.artifact_type == "text/plain"


def test_queued_jobs_no_plugin_handles_are_failed(either_store: JobStore) -> None:
    kept = either_store.create("echo", {}, max_queue=10)
    gone = either_store.create("gone", {}, max_queue=10)
    failed = either_store.fail_unhandled(frozenset({"echo"}), lambda t: f"no plugin for {t!r}")
    assert failed == [gone.id]
    ended = either_store.get(gone.id)
    assert ended is not None and ended.status == "failed"
    assert ended.error == "no plugin for 'gone'" and ended.error_kind == "unavailable"
    assert either_store.get(kept.id).status == "queued"  # type: ignore[union-attr]
    assert either_store.waiting_count() == 1


def test_queue_counts_are_the_waiting_and_running_jobs(either_store: JobStore) -> None:
    assert either_store.queue_counts() == (0, 0)
    jobs = [either_store.create("echo", {}, max_queue=10) for _ in range(3)]
    _claim(either_store, jobs[0].id)
    assert either_store.queue_counts() == (2, 1)
    assert either_store.queue_counts() == (
        either_store.waiting_count(),
        len(either_store.running()),
    )


def test_a_declared_file_type_is_kept_beside_priority_deadline_key_and_retry(
    either_store: JobStore,
) -> None:
    """Both issues' fields go through one create: none of them drops another."""
    from kiapi_core.jobs.store import IdempotencyKey

    key = IdempotencyKey("k1", "fp", 60)
    first = either_store.create(
        "echo",
        {},
        max_queue=10,
        artifact_type="image/png",
        priority=3,
        cancel_after_s=600,
        idempotency=key,
    )
    again = either_store.create(
        "echo", {}, max_queue=10, artifact_type="image/png", idempotency=key
    )
    assert again.replayed and again.id == first.id and again.artifact_type == "image/png"
    stored = either_store.get(first.id)
    assert stored is not None and stored.artifact_type == "image/png" and stored.priority == 3
    assert stored.deadline is not None and stored.deadline > stored.created_at
    either_store.cancel(first.id)
    retry = either_store.create(
        "echo", {}, max_queue=10, artifact_type=stored.artifact_type, retry_of=first.id
    )
    assert either_store.get(retry.id).artifact_type == "image/png"  # type: ignore[union-attr]
    assert either_store.get(first.id).retried_by == retry.id  # type: ignore[union-attr]


def _outbox(store: JobStore) -> Any:
    if isinstance(store, RedisJobStore):
        from kiapi_core.state.redis import RedisOutbox

        return RedisOutbox(store.r, store.p)
    from kiapi_core.jobs.store import SqliteJobStore
    from kiapi_core.webhooks.outbox import SqliteOutbox

    assert isinstance(store, SqliteJobStore)
    return SqliteOutbox(store.db)


def test_retention_deletes_jobs_finished_before_the_cutoff_and_nothing_else(
    either_store: JobStore,
) -> None:
    store = either_store
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["completed"], "progress_ms": 0}
    done = store.create("echo", {}, max_queue=10, idempotency=IdempotencyKey("k", "fp", 600))
    store.finish(done.id, "succeeded", worker=_claim(store, done.id), result={"text": "x"})
    canceled = store.create("echo", {}, max_queue=10)
    store.cancel(canceled.id)
    hooked = store.create("echo", {}, max_queue=10, webhook=hook)
    store.finish(hooked.id, "failed", worker=_claim(store, hooked.id), error="e")
    time.sleep(0.05)
    cutoff = time.time()
    time.sleep(0.05)
    young = store.create("echo", {}, max_queue=10)
    store.finish(young.id, "succeeded", worker=_claim(store, young.id), result={})
    running = store.create("echo", {}, max_queue=10)
    _claim(store, running.id)
    queued = store.create("echo", {}, max_queue=10)
    ttl = 3600.0

    assert store.sweep_finished(0, now=cutoff + 10 * ttl) == 0  # 0 keeps every job
    assert store.sweep_finished(ttl, now=cutoff) == 0  # none finished an hour ago
    assert done.id in {e.job_id for e in store.events_after(None, limit=10_000)}
    # The webhook's delivery is still to be made: its job stays until it is.
    assert store.sweep_finished(ttl, now=cutoff + ttl) == 2
    assert store.get(done.id) is None and store.get(canceled.id) is None
    for kept in (hooked, young, queued, running):
        assert store.get(kept.id) is not None, kept.id
    listed, _ = store.list(status=None, job_type=None, limit=50, cursor=None)
    assert {j.id for j in listed} == {hooked.id, young.id, queued.id, running.id}
    for status in ("succeeded", "canceled"):
        page, _ = store.list(status=status, job_type="echo", limit=50, cursor=None)
        assert done.id not in {j.id for j in page} and canceled.id not in {j.id for j in page}
    assert store.events_after(None, job_id=done.id) == []
    # Nor from the whole journal (GET /v1/events): a deleted job's JSON holds its params.
    journal = {e.job_id for e in store.events_after(None, limit=10_000)}
    assert done.id not in journal and canceled.id not in journal
    assert {hooked.id, young.id, queued.id, running.id} <= journal
    # The key's job is gone: the same key and request make a new job, not a 404 or a replay.
    again = store.create("echo", {}, max_queue=10, idempotency=IdempotencyKey("k", "fp", 600))
    assert not again.replayed and again.id != done.id

    outbox = _outbox(store)
    (delivery,) = outbox.claim("d1", 10, 30)
    assert delivery.job_id == hooked.id
    outbox.record(delivery, "d1", outcome="delivered", status_code=200)
    assert store.sweep_finished(ttl, now=cutoff + ttl) == 1
    assert store.get(hooked.id) is None and outbox.claim("d1", 10, 30) == []
    assert store.get(young.id) is not None
    assert store.sweep_finished(ttl, now=time.time() + ttl) == 1  # young's turn
    assert store.get(queued.id) is not None and store.get(running.id) is not None


def test_redis_retention_finds_jobs_that_finished_before_it_was_indexed(
    store: RedisJobStore, client: redis.Redis
) -> None:
    old = store.create("echo", {}, max_queue=10)
    store.cancel(old.id)
    client.delete("t:done")  # as a Redis written by the release before P:done
    assert store.sweep_finished(60, now=time.time() + 120) == 1
    assert store.get(old.id) is None and client.exists("t:done:indexed")
