"""Accept negotiation: the parser and chooser (RFC 9110 §12.5.1), then the job helper over HTTP."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from kiapi_core.web.negotiation import MalformedAccept, choose, parse_accept, quality

TEXT, JSON, PNG = "text/plain", "application/json", "image/png"
ECHO = "/v1/text/echo/run"


# -- kiapi_core.web.negotiation ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "offers", "expected"),
    [
        # No header, or a blank one, means anything: the server's first offer.
        (None, [TEXT, JSON], TEXT),
        ("", [TEXT, JSON], TEXT),
        ("   ", [JSON, TEXT], JSON),
        # Exact matches.
        (JSON, [TEXT, JSON], JSON),
        (TEXT, [TEXT, JSON], TEXT),
        (PNG, [PNG, JSON], PNG),
        # Wildcards: */* ties everything, so the server's preference (first offer) wins.
        ("*/*", [PNG, JSON], PNG),
        ("*/*", [JSON, PNG], JSON),
        ("image/*", [PNG, JSON], PNG),
        ("image/*", [JSON, PNG], PNG),
        ("text/*", [TEXT, JSON], TEXT),
        ("text/*", [PNG, JSON], None),
        ("application/*", [PNG, JSON], JSON),
        # q-values decide.
        ("application/json;q=0.5, text/plain", [TEXT, JSON], TEXT),
        ("application/json, text/plain;q=0.5", [TEXT, JSON], JSON),
        ("text/plain;q=0.2, application/json;q=0.9", [TEXT, JSON], JSON),
        ("image/*;q=0.8, application/json;q=0.9", [PNG, JSON], JSON),
        ("*/*;q=0.1, application/json", [PNG, JSON], JSON),
        ("*/*;q=0.9, image/png;q=0.95", [PNG, JSON], PNG),
        # The most specific range sets the quality, even when a broader one is higher.
        ("image/png;q=0, image/*", [PNG, JSON], None),
        ("*/*, image/png;q=0", [PNG, JSON], JSON),
        ("text/*;q=0, */*", [TEXT, JSON], JSON),
        ("application/json;q=0", [TEXT, JSON], None),
        # Equal q: the earlier offer (server preference) wins.
        ("application/json, text/plain", [TEXT, JSON], TEXT),
        ("application/json;q=0.5, text/plain;q=0.5", [JSON, TEXT], JSON),
        # Case, whitespace and parameters.
        ("Application/JSON", [TEXT, JSON], JSON),
        ("  application/json ; q=0.7 ,text/plain ; q = 0.6 ", [TEXT, JSON], JSON),
        ("text/plain; charset=utf-8; q=0.3, application/json;q=0.4", [TEXT, JSON], JSON),
        ('text/plain; format="flowed"', [TEXT, JSON], TEXT),
        # Malformed ranges are skipped when others are valid.
        ("garbage, application/json", [TEXT, JSON], JSON),
        ("text/plain;q=abc, application/json;q=0.1", [TEXT, JSON], JSON),
        ("text/plain;q=2, application/json;q=0.1", [TEXT, JSON], JSON),
        ("*/plain, application/json", [TEXT, JSON], JSON),
        # Nothing acceptable.
        ("video/mp4", [TEXT, JSON], None),
        ("application/xml", [TEXT, JSON], None),
    ],
)
def test_choose(header: str | None, offers: list[str], expected: str | None) -> None:
    assert choose(header, offers) == expected


def test_choose_without_offers() -> None:
    assert choose(None, []) is None
    assert choose("*/*", []) is None


@pytest.mark.parametrize(
    "header", ["garbage", "text", "/json", "text/", "*/plain", "a/b;q=x", ";;,,"]
)
def test_all_malformed_raises(header: str) -> None:
    with pytest.raises(MalformedAccept):
        choose(header, [TEXT, JSON])


def test_parse_accept_values() -> None:
    ranges = parse_accept("text/html;level=1;q=0.4, */*;q=0.1, image/*")
    assert [(r.type, r.subtype, r.q) for r in ranges] == [
        ("text", "html", 0.4),
        ("*", "*", 0.1),
        ("image", "*", 1.0),
    ]
    assert ranges[0].params == (("level", "1"),)
    assert quality(ranges, "text/html") == 0.4
    assert quality(ranges, "image/webp") == 1.0
    assert quality(ranges, "application/json") == 0.1
    assert quality(parse_accept("text/plain"), "application/json") == 0.0


def test_q_bounds() -> None:
    assert [r.q for r in parse_accept("a/b;q=0, c/d;q=1, e/f;q=0.001")] == [0.0, 1.0, 0.001]
    # Out-of-range and non-numeric q-values invalidate their range only.
    assert [r.type for r in parse_accept("a/b;q=1.5, c/d;q=-1, e/f;q=nan, g/h")] == ["g"]


# -- through the job helper (echo offers text/plain, then application/json) -------------------
@pytest.mark.parametrize(
    ("accept", "raw"),
    [
        (None, True),
        ("*/*", True),
        ("text/*", True),
        ("text/plain", True),
        ("text/plain, application/json", True),
        ("application/json;q=0.5, text/plain", True),
        ("application/json", False),
        ("application/*", False),
        ("text/plain;q=0.5, application/json", False),
        ("*/*;q=0.1, application/json", False),
        ("text/*;q=0, */*", False),
    ],
)
def test_sync_accept(client: TestClient, accept: str | None, raw: bool) -> None:
    headers = {} if accept is None else {"Accept": accept}
    if accept is None:
        # httpx sends "Accept: */*" by default; drop it to test an absent header.
        client.headers.pop("accept", None)
        assert "accept" not in client.headers
    r = client.post(ECHO, json={"text": "négociation", "steps": 1, "delay_s": 0}, headers=headers)
    assert r.status_code == 200, r.text
    if raw:
        assert r.headers["content-type"].startswith("text/plain")
        assert r.content == "négociation".encode()
        assert r.headers["x-kiapi-job-id"].startswith("job_")
        assert r.headers["x-kiapi-file-id"].startswith("file_")
    else:
        assert r.headers["content-type"] == "application/json"
        job = r.json()
        assert job["status"] == "succeeded"
        assert job["result"]["text"] == "négociation"


@pytest.mark.parametrize(
    "accept", ["image/png", "application/xml", "text/plain;q=0, application/json;q=0"]
)
def test_sync_unacceptable_is_406_before_any_job(client: TestClient, accept: str) -> None:
    r = client.post(ECHO, json={"text": "x"}, headers={"Accept": accept})
    assert r.status_code == 406
    detail = r.json()["detail"]
    assert "text/plain" in detail and "application/json" in detail
    # Nothing was queued for a request that could never be answered.
    assert client.get("/v1/jobs").json()["jobs"] == []


def test_sync_malformed_accept_is_406(client: TestClient) -> None:
    r = client.post(ECHO, json={"text": "x"}, headers={"Accept": "not a media type"})
    assert r.status_code == 406
    assert "Accept" in r.json()["detail"]


def test_async_ignores_accept(client: TestClient) -> None:
    # An async submit always answers the small JSON receipt, whatever Accept says.
    r = client.post(ECHO, json={"text": "x", "mode": "async"}, headers={"Accept": "text/plain"})
    assert r.status_code == 202
    assert set(r.json()) == {"job_id", "type", "status"}
