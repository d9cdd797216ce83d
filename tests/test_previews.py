"""Live previews end to end: the echo plugin publishes them through ``ctx.publish_preview``, a
real server stores the latest and serves it (SSE ``preview`` events, GET .../preview with
ETag/304), in process mode, thread mode and with Celery + a real Redis."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers import LiveServer, start_server
from PIL import Image

from kiapi_core.jobs.previews import (
    PREVIEW_MAX_SIDE,
    MemoryPreviews,
    PreviewGate,
    build_preview,
    encode_preview,
)
from kiapi_core.testing.sse import SseEvent, job_events

ECHO = "/v1/text/echo/run"
FAST = {"KIAPI_PREVIEW_MIN_INTERVAL_S": "0"}


def submit(c: httpx.Client, **body: Any) -> str:
    r = c.post(ECHO, json={"text": "hi", "mode": "async", **body})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    return job_id


class Fetcher:
    """On the first preview event, fetches the preview while the job still runs."""

    def __init__(self, c: httpx.Client, job_id: str) -> None:
        self.c, self.job_id = c, job_id
        self.first: httpx.Response | None = None
        self.again: httpx.Response | None = None

    def __call__(self, event: SseEvent) -> None:
        if event.event == "preview" and self.first is None:
            self.first = self.c.get(f"/v1/jobs/{self.job_id}/preview")
            etag = self.first.headers.get("etag", "")
            self.again = self.c.get(
                f"/v1/jobs/{self.job_id}/preview", headers={"If-None-Match": etag}
            )


def check_stream(c: httpx.Client, job_id: str, steps: int) -> list[SseEvent]:
    """The stream has previews before ``end``, each repeating the last durable id; the
    preview was fetchable (ETag, 304) while the job ran, and is gone after."""
    fetch = Fetcher(c, job_id)
    events = job_events(c, job_id, on_event=fetch)
    assert events[-1].event == "end" and events[-1].data["status"] == "succeeded", events
    previews = [e for e in events if e.event == "preview"]
    assert previews, [e.event for e in events]
    last_durable: str | None = None
    for event in events:
        if event.event == "preview":
            assert event.id == last_durable, events
            assert set(event.data) == {"job_id", "step", "steps", "width", "height", "media_type"}
            assert event.data["job_id"] == job_id and event.data["steps"] == steps
            assert 1 <= event.data["step"] <= steps
            assert event.data["media_type"] == "image/jpeg"
            # 640x480 from the handler, downsized by the host.
            assert (event.data["width"], event.data["height"]) == (256, 192)
        else:
            last_durable = event.id
    assert fetch.first is not None and fetch.first.status_code == 200, fetch.first
    assert fetch.first.headers["content-type"] == "image/jpeg"
    assert fetch.first.headers["cache-control"] == "no-cache"
    image = Image.open(io.BytesIO(fetch.first.content))
    assert image.format == "JPEG" and image.size == (256, 192)
    assert fetch.again is not None and fetch.again.status_code == 304
    assert fetch.again.content == b""
    gone = c.get(f"/v1/jobs/{job_id}/preview")
    assert gone.status_code == 404 and "dropped when a job ends" in gone.json()["detail"]
    return events


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_previews_stream_and_fetch(mode: str, live_server: Any) -> None:
    server: LiveServer = live_server({**FAST, "KIAPI_WORKER_MODE": mode})
    with server.client() as c:
        job_id = submit(c, steps=6, delay_s=0.25, preview_width=640)
        events = check_stream(c, job_id, steps=6)
        # No rate limit in time here: one preview per step, each step once.
        steps = [e.data["step"] for e in events if e.event == "preview"]
        assert steps == sorted(set(steps)) and len(steps) >= 4, steps


def test_every_kth_step_and_per_request_opt_out(live_server: Any) -> None:
    server: LiveServer = live_server({**FAST, "KIAPI_PREVIEW_EVERY": "2"})
    with server.client() as c:
        job_id = submit(c, steps=6, delay_s=0.1, preview_width=640)
        events = job_events(c, job_id)
        steps = [e.data["step"] for e in events if e.event == "preview"]
        assert steps and all(s % 2 == 0 for s in steps), steps

        quiet = submit(c, steps=6, delay_s=0.2, preview_width=640, preview=False)
        seen: list[int] = []

        def probe(event: SseEvent) -> None:
            if event.event == "progress" and event.data["status"] == "running":
                seen.append(c.get(f"/v1/jobs/{quiet}/preview").status_code)

        events = job_events(c, quiet, on_event=probe)
        assert events[-1].data["status"] == "succeeded"
        assert [e.event for e in events if e.event == "preview"] == []
        assert seen and set(seen) == {404}, seen
        detail = c.get(f"/v1/jobs/{quiet}/preview").json()["detail"]
        assert quiet in detail


def test_previews_off_for_the_server(live_server: Any) -> None:
    server: LiveServer = live_server({**FAST, "KIAPI_PREVIEWS": "false"})
    with server.client() as c:
        job_id = submit(c, steps=4, delay_s=0.1, preview_width=640)
        events = job_events(c, job_id)
        assert events[-1].data["status"] == "succeeded"
        assert "preview" not in [e.event for e in events]


def test_preview_of_an_unknown_job_is_404(live_server: Any) -> None:
    server: LiveServer = live_server()
    with server.client() as c:
        r = c.get("/v1/jobs/job_0123456789abcdef/preview")
        assert r.status_code == 404 and "no job" in r.json()["detail"]
        spec = c.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}/preview"]["get"]
        assert {"200", "304", "404"} <= set(spec["responses"])


@pytest.fixture(scope="module")
def celery_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from kiapi_core.testing.redis import start_redis, start_worker

    root = tmp_path_factory.mktemp("previews-celery")
    redis_server = start_redis(root / "redis")
    env = {
        **FAST,
        "KIAPI_BACKEND": "celery",
        "KIAPI_REDIS_URL": redis_server.url,
        "KIAPI_REDIS_PREFIX": "kiapi-previews-test",
        "KIAPI_FILES_DIR": str(root / "shared-files"),
        "KIAPI_PLUGINS": "echo",
        "KIAPI_WORKER_NICE": "0",
    }
    api = worker = None
    try:
        api = start_server(root / "api", env)
        worker = start_worker(root / "worker", "w", env)
        yield api
    finally:
        for proc in (worker, api):
            if proc is not None:
                proc.stop()
        redis_server.stop()


def test_previews_with_celery_and_redis(celery_cluster: LiveServer) -> None:
    """The worker keeps the preview in Redis and announces it on the job events channel:
    the API node streams and serves it."""
    with celery_cluster.client() as c:
        job_id = submit(c, steps=6, delay_s=0.3, preview_width=640)
        check_stream(c, job_id, steps=6)


# -- the host's side, without a server -------------------------------------------------------


def test_encode_preview_downsizes_and_keeps_small_webp_or_jpeg() -> None:
    big = Image.new("RGBA", (1000, 400), (10, 20, 30, 255))
    data, width, height, media = encode_preview(big)
    assert (width, height, media) == (PREVIEW_MAX_SIDE, 102, "image/jpeg")
    assert Image.open(io.BytesIO(data)).size == (256, 102)
    small = io.BytesIO()
    Image.new("RGB", (64, 32)).save(small, format="WEBP")
    assert encode_preview(small.getvalue()) == (small.getvalue(), 64, 32, "image/webp")
    png = io.BytesIO()
    Image.new("RGB", (64, 32)).save(png, format="PNG")
    assert encode_preview(png.getvalue())[3] == "image/jpeg"  # PNG is re-encoded
    with pytest.raises(ValueError, match="no image"):
        encode_preview(b"not an image")
    with pytest.raises(TypeError, match="PIL image or encoded image bytes"):
        encode_preview("a string")


def test_memory_previews_keep_the_latest_and_tell_followers() -> None:
    told: list[int] = []
    store = MemoryPreviews(on_put=lambda info: told.append(info.step))
    for step in (1, 2):
        store.put(build_preview("job_a", Image.new("RGB", (8, 8)), step, 4))
    latest = store.get("job_a")
    assert latest is not None and latest.info.step == 2 and told == [1, 2]
    store.drop("job_a")
    assert store.get("job_a") is None


def test_gate_takes_every_kth_step_and_the_min_interval() -> None:
    gate = PreviewGate(True, every=3, min_interval_s=0)
    assert [s for s in range(1, 10) if gate.wants(s)] == [3, 6, 9]
    slow = PreviewGate(True, every=1, min_interval_s=3600)
    assert slow.wants(1)
    slow.published()
    assert not slow.wants(2)
    assert not PreviewGate(False, every=1, min_interval_s=0).wants(1)
