"""One real generation on the tiny checkpoint streams live previews before its end."""

from __future__ import annotations

import io

from PIL import Image

from kiapi_core.testing import LiveServer
from kiapi_core.testing.sse import SseEvent, job_events

GENERATE = "/v1/image/ideogram4/generate"


def test_a_generation_streams_previews_and_serves_the_latest(server: LiveServer) -> None:
    with server.client(timeout=600) as c:
        r = c.post(
            GENERATE,
            json={
                "prompt": "a red square",
                "width": 256,
                "height": 320,
                "preset": "V4_TURBO_12",
                "seed": 3,
                "mode": "async",
            },
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        fetched: list[bytes] = []

        def fetch(event: SseEvent) -> None:
            # Stored before it is announced: fetchable at once, until the job ends.
            if event.event == "preview" and not fetched:
                got = c.get(f"/v1/jobs/{job_id}/preview")
                assert got.status_code == 200, got.text
                assert got.headers["content-type"] == "image/jpeg"
                fetched.append(got.content)

        events = job_events(c, job_id, on_event=fetch, timeout=600)
    kinds = [e.event for e in events]
    assert kinds[-1] == "end" and events[-1].data["status"] == "succeeded", events[-1]
    previews = [e.data for e in events if e.event == "preview"]
    assert previews and kinds.index("preview") < kinds.index("end")
    # The latent grid of a 256 x 320 image: one preview pixel per 8 x 8 image pixels.
    assert all((p["width"], p["height"], p["steps"]) == (32, 40, 12) for p in previews)
    assert fetched
    image = Image.open(io.BytesIO(fetched[0]))
    assert image.size == (32, 40) and image.mode == "RGB"
    assert events[-1].data["params"]["preview"] is True
