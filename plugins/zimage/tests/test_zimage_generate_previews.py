"""One real Z-Image generation on the tiny checkpoint streams live previews before its end."""

from __future__ import annotations

from zcli import SMALL

from kiapi_core.testing import LiveServer
from kiapi_core.testing.sse import job_events


def test_a_generation_streams_previews(server: LiveServer) -> None:
    body = {"prompt": "a red cat", **SMALL, "width": 64, "height": 80, "seed": 1, "mode": "async"}
    with server.client(timeout=600) as c:
        r = c.post("/v1/image/zimage/generate", json=body)
        assert r.status_code == 202, r.text
        events = job_events(c, r.json()["job_id"], timeout=600)
    kinds = [e.event for e in events]
    assert kinds[-1] == "end" and events[-1].data["status"] == "succeeded", events[-1]
    previews = [e.data for e in events if e.event == "preview"]
    assert previews and kinds.index("preview") < kinds.index("end")
    # One preview pixel per 8 x 8 image pixels.
    assert all((p["width"], p["height"], p["steps"]) == (8, 10, 2) for p in previews)
