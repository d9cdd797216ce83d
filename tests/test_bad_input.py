"""Bad input, case by case, against a live server: each gets its documented 4xx and a message
that names the problem, and the server is healthy after every one of them.

One server (ideogram4 active on the tiny checkpoint, the echo plugin installed, a small upload
limit) takes the whole matrix. Paths that a client library would normalise ("..", "//") go out
as raw request lines.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from reliability import (
    ECHO,
    GENERATE,
    OFFLINE,
    assert_healthy,
    cancel_everything,
    ideogram4_home,
    wait_terminal,
)

from kiapi_core.testing import LiveServer, start_server

UPLOAD_LIMIT = 64 * 1024
BODY_LIMIT = 1024 * 1024  # the default KIAPI_MAX_BODY_BYTES
VALIDATE = "/v1/image/ideogram4/validate"
JSON = {"content-type": "application/json"}
RANGE = "within 256..2048"
STEP = "multiple of 16"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    home = ideogram4_home(tmp_path_factory.mktemp("bad-input"))
    live = start_server(
        home,
        {
            **OFFLINE,
            "KIAPI_PLUGINS": "echo,ideogram4",
            "KIAPI_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        },
    )
    try:
        yield live
        with live.client() as c:
            cancel_everything(c)
        assert_healthy(live)
        assert "unhandled error" not in live.output()
    finally:
        live.stop()


@pytest.fixture(scope="module")
def openapi(server: LiveServer) -> dict[str, Any]:
    with server.client() as c:
        doc: dict[str, Any] = c.get("/openapi.json").json()
    return doc


@dataclass(frozen=True)
class Bad:
    """One bad request and what must come back."""

    method: str
    path: str
    status: int
    needles: tuple[str, ...]  # each must appear in the error body (case-insensitive)
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    operation: str | None = None  # the documented path template, when the route exists
    raw: bool = False  # send the request line byte for byte


def gen(payload: Any, status: int, *needles: str, **headers: str) -> Bad:
    return Bad(
        "POST",
        GENERATE,
        status,
        needles,
        json.dumps(payload).encode(),
        {**JSON, **headers},
        GENERATE,
    )


def gen_raw(body: bytes, status: int, *needles: str, **headers: str) -> Bad:
    return Bad("POST", GENERATE, status, needles, body, {**JSON, **headers}, GENERATE)


def nested(depth: int, leaf: str = "1") -> str:
    return '{"a": ' * depth + leaf + "}" * depth


P = {"prompt": "a red poster that says HELLO"}
# Python's json reads these as floats that strict JSON (every answer) cannot write back.
NON_FINITE = {"1e400": b"1e400", "nan": b"NaN", "inf": b"Infinity", "-inf": b"-Infinity"}
# 30,001 characters (under the prompt limit) that mflux would parse with recursive json.
STRING_BOMB = '{"a":' * 5000 + "1" + "}" * 5000
WEIGHT_LOC = '["body", "prompt", "weight"]'


def caption_with(number: bytes) -> bytes:
    return (
        b'{"prompt": {"high_level_description": "a poster", "weight": '
        + number
        + b'}, "mode": "async"}'
    )


def validate(payload: Any, status: int, *needles: str) -> Bad:
    return Bad("POST", VALIDATE, status, needles, json.dumps(payload).encode(), JSON, VALIDATE)


JOB_TEMPLATES = (
    ("GET", "/v1/jobs/{job_id}"),
    ("DELETE", "/v1/jobs/{job_id}"),
    ("GET", "/v1/jobs/{job_id}/events"),
)
FILE_TEMPLATES = (
    ("GET", "/v1/files/{file_id}"),
    ("GET", "/v1/files/{file_id}/download"),
    ("DELETE", "/v1/files/{file_id}"),
)
BAD_IDS = {
    "dotdot": "..%2f..%2fkiapi.db",
    "encoded-dotdot": "%2e%2e%2f%2e%2e%2fkiapi.db",
    "double-encoded": "%252e%252e%252fkiapi.db",
    "absolute": "%2Fetc%2Fpasswd",
    "nul": "job_0123456789abcdef%00",
    "nul-file": "file_0123456789abcdef%00",
    "overlong": "job_" + "a" * 5000,
    "overlong-file": "file_" + "0" * 5000,
    "uppercase": "job_0123456789ABCDEF",
    "backslash": "..%5c..%5ckiapi.db",
}


def _id_cases() -> list[tuple[str, Bad]]:
    out = []
    for name, bad_id in BAD_IDS.items():
        for method, template in (*JOB_TEMPLATES, *FILE_TEMPLATES):
            kind = "job" if "{job_id}" in template else "file"
            path = template.replace("{job_id}", bad_id).replace("{file_id}", bad_id)
            # The server decodes %2F before routing: such an "id" spans segments and matches
            # no route at all; the 404 then names the path instead of the id rule.
            spans = "%2f" in bad_id.lower()
            needle = "no route matches" if spans else f"{kind} ids look like"
            case = Bad(method, path, 404, (needle,), operation=None if spans else template)
            out.append((f"id-{name}-{method}-{template}", case))
    return out


def _raw_path_cases() -> list[tuple[str, Bad]]:
    """Request lines no client library would send as is; none may reach a file."""
    paths = [
        "/v1/jobs/../../kiapi.db",
        "/v1/jobs/../files/../../kiapi.db",
        "/v1/files/../../kiapi.db/download",
        "/v1/files//etc/passwd/download",
        "/v1/jobs//etc/passwd",
        "/v1/files/./../kiapi.db",
        "/v1/files/%2e%2e/%2e%2e/kiapi.db/download",
    ]
    return [(f"raw-{p}", Bad("GET", p, 404, ("not found",), raw=True)) for p in paths]


MATRIX: list[tuple[str, Bad]] = [
    # -- the body is not a JSON object -----------------------------------------------------
    ("malformed-json", gen_raw(b'{"prompt": "x",', 422, "malformed JSON", "line 1")),
    ("truncated-json", gen_raw(b'{"prompt": "x"', 422, "malformed JSON")),
    ("single-quotes", gen_raw(b"{'prompt': 'x'}", 422, "malformed JSON")),
    ("empty-body", gen_raw(b"", 422, "body is empty")),
    ("json-array", gen_raw(b"[]", 422, "expected a JSON object", "list")),
    ("json-null", gen_raw(b"null", 422, "expected a JSON object")),
    ("json-string", gen_raw(b'"prompt"', 422, "expected a JSON object", "str")),
    ("non-utf8", gen_raw(b'{"prompt": "caf\xe9 \xff"}', 422, "not valid UTF-8")),
    (
        "int-5000-digits",
        gen_raw(b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}", 422, "malformed JSON", "digits"),
    ),
    (
        "lone-surrogate",
        gen_raw(b'{"prompt": "caf\\ud800e"}', 422, "prompt", "surrogate", "not valid unicode"),
    ),
    (
        "lone-surrogate-key",
        gen_raw(b'{"prompt": {"\\udfff": "x"}}', 422, "a key", "surrogate"),
    ),
    ("nan-literal", gen_raw(b'{"prompt": "x", "seed": NaN}', 422, "seed")),
    (
        "wrong-content-type",
        gen(P, 415, "Content-Type", "text/plain", **{"content-type": "text/plain"}),
    ),
    (
        "form-content-type",
        gen(
            P,
            415,
            "application/x-www-form-urlencoded",
            **{"content-type": "application/x-www-form-urlencoded"},
        ),
    ),
    # -- prompt ----------------------------------------------------------------------------
    ("missing-prompt", gen({"width": 256}, 422, "prompt", "field required")),
    ("blank-prompt", gen({"prompt": " \t\n "}, 422, "prompt", "empty or blank")),
    ("empty-prompt", gen({"prompt": ""}, 422, "prompt", "empty")),
    ("empty-caption", gen({"prompt": {}}, 422, "prompt", "caption object must not be empty")),
    ("null-prompt", gen({"prompt": None}, 422, "prompt")),
    ("number-prompt", gen({"prompt": 42}, 422, "prompt")),
    ("list-prompt", gen({"prompt": ["a", "b"]}, 422, "prompt")),
    (
        "nested-caption-10k",
        gen_raw(('{"prompt": ' + nested(10_000) + "}").encode(), 422, "nested deeper than 64"),
    ),
    (
        "nested-list-10k",
        gen_raw(b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 422, "nested deeper"),
    ),
    (
        "nested-caption-100",
        gen({"prompt": json.loads(nested(100))}, 422, "nested deeper than 64"),
    ),
    (
        "prompt-900kb",
        gen({"prompt": "x" * 900_000}, 422, "prompt", "longer than 32768 characters"),
    ),
    (
        "caption-too-long",
        gen({"prompt": {"high_level_description": "y" * 40_000}}, 422, "longer than 32768"),
    ),
    (
        "body-over-limit",
        gen_raw(b'{"prompt": "' + b"z" * BODY_LIMIT + b'"}', 413, "KIAPI_MAX_BODY_BYTES"),
    ),
    (
        "too-many-values",
        gen_raw(
            b'{"prompt": "x", "model": "none", "junk": [' + b"0," * 150_000 + b"0]}",
            422,
            "KIAPI_MAX_JSON_VALUES",
        ),
    ),
    # -- numbers JSON cannot carry, anywhere (issue 13) --------------------------------------
    *(
        (f"caption-{name}", gen_raw(caption_with(literal), 422, WEIGHT_LOC, "not finite"))
        for name, literal in NON_FINITE.items()
    ),
    (
        "string-caption-nan",
        gen(
            {"prompt": '{"high_level_description": "a", "w": NaN}', "model": "none"},
            422,
            "prompt",
            "not finite",
        ),
    ),
    (
        "extra-field-inf",
        gen_raw(b'{"prompt": "x", "model": "none", "x-rate": -Infinity}', 422, "x-rate"),
    ),
    # -- JSON inside a string prompt gets the body's nesting limit ----------------------------
    (
        "string-caption-nested-async",
        gen({"prompt": STRING_BOMB, "mode": "async"}, 422, "prompt", "nested deeper than 64"),
    ),
    (
        "string-caption-nested-strict",
        gen(
            {"prompt": STRING_BOMB, "strict_caption_validation": True},
            422,
            "prompt",
            "nested deeper than 64",
        ),
    ),
    ("validate-string-nested", validate({"prompt": STRING_BOMB}, 422, "nested deeper than 64")),
    (
        "validate-string-int-5000-digits",
        validate({"prompt": '{"seed": ' + "7" * 5000 + "}"}, 422, "prompt", "4300 digits"),
    ),
    ("validate-prompt-too-long", validate({"prompt": "x" * 40_000}, 422, "longer than 32768")),
    (
        "validate-caption-inf",
        Bad("POST", VALIDATE, 422, (WEIGHT_LOC,), caption_with(b"1e999"), JSON),
    ),
    # -- sizes -----------------------------------------------------------------------------
    ("huge-width", gen({**P, "width": 1_000_000}, 422, "width", RANGE)),
    ("huge-int-height", gen({**P, "height": 10**40}, 422, "height", RANGE)),
    ("negative-width", gen({**P, "width": -512}, 422, "width", RANGE)),
    ("zero-height", gen({**P, "height": 0}, 422, "height", RANGE)),
    ("width-too-small", gen({**P, "width": 240}, 422, "width", RANGE)),
    ("width-too-big", gen({**P, "width": 2064}, 422, "width", RANGE)),
    ("non-multiple-width", gen({**P, "width": 1000}, 422, "width", STEP)),
    ("non-multiple-height", gen({**P, "height": 257}, 422, "height", STEP)),
    ("float-width", gen({**P, "width": 512.0}, 422, "width", "integer")),
    ("fractional-height", gen({**P, "height": 512.5}, 422, "height", "integer")),
    ("string-width", gen({**P, "width": "512"}, 422, "width", "integer")),
    ("bool-width", gen({**P, "width": True}, 422, "width", "integer")),
    # -- other fields ----------------------------------------------------------------------
    ("quantize-7", gen({**P, "quantize": 7}, 422, "quantize", "3, 4, 5, 6, 8")),
    ("quantize-string", gen({**P, "quantize": "8"}, 422, "quantize", "integer")),
    ("quality-0", gen({**P, "quality": 0}, 422, "quality", "greater than or equal to 1")),
    ("quality-101", gen({**P, "quality": 101}, 422, "quality", "less than or equal to 100")),
    ("quality-float", gen({**P, "quality": 90.5}, 422, "quality", "integer")),
    ("seed-negative", gen({**P, "seed": -1}, 422, "seed", "unsigned 64-bit")),
    ("seed-too-big", gen({**P, "seed": 2**64}, 422, "seed", "unsigned 64-bit")),
    ("unknown-preset", gen({**P, "preset": "V5_FAST"}, 422, "preset", "V4_TURBO_12")),
    ("unknown-format", gen({**P, "format": "gif"}, 422, "format", "'png'", "'webp'")),
    ("unknown-mode", gen({**P, "mode": "later"}, 422, "mode", "'sync'", "'async'")),
    ("bool-as-string", gen({**P, "strict_caption_validation": "yes"}, 422, "strict_caption")),
    ("bool-as-number", gen({**P, "warn_on_caption_issues": 0}, 422, "warn_on_caption")),
    (
        "unknown-model",
        gen({**P, "model": "sdxl"}, 400, "unknown model 'sdxl'", "fp8", "ideogram-4"),
    ),
    ("model-number", gen({**P, "model": 4}, 422, "model")),
    (
        "several-bad-fields",
        gen({"prompt": "", "width": 1000, "quality": 0}, 422, "prompt", "width", "quality"),
    ),
    # -- Accept ----------------------------------------------------------------------------
    ("accept-html", gen(P, 406, "text/html", "image/png", "application/json", accept="text/html")),
    ("accept-garbage", gen(P, 406, "no valid media range", accept="garbage;;;")),
    ("accept-bad-q", gen(P, 406, "no valid media range", accept="image/png;q=abc")),
    ("accept-q-zero", gen(P, 406, "matches nothing", accept="image/png;q=0, application/json;q=0")),
    # -- the caption checker takes the same abuse -------------------------------------------
    (
        "validate-nested-10k",
        Bad(
            "POST",
            VALIDATE,
            422,
            ("nested deeper than 64",),
            ('{"prompt": ' + nested(10_000) + "}").encode(),
            JSON,
            VALIDATE,
        ),
    ),
    (
        "validate-malformed",
        Bad("POST", VALIDATE, 422, ("malformed JSON",), b"{", JSON, VALIDATE),
    ),
    # -- query parameters -------------------------------------------------------------------
    (
        "limit-zero",
        Bad("GET", "/v1/jobs?limit=0", 422, ("limit", "1 to 500"), operation="/v1/jobs"),
    ),
    (
        "limit-huge",
        Bad("GET", "/v1/files?limit=99999999999999999999", 422, ("limit",), operation="/v1/files"),
    ),
    ("limit-word", Bad("GET", "/v1/jobs?limit=ten", 422, ("limit",), operation="/v1/jobs")),
    ("cursor-word", Bad("GET", "/v1/jobs?cursor=abc", 422, ("cursor",), operation="/v1/jobs")),
    ("cursor-empty", Bad("GET", "/v1/files?cursor=", 422, ("cursor",), operation="/v1/files")),
    (
        "status-unknown",
        Bad("GET", "/v1/jobs?status=done", 422, ("status", "succeeded"), operation="/v1/jobs"),
    ),
    (
        "job-filter-traversal",
        Bad(
            "GET",
            "/v1/files?job_id=..%2F..%2Fkiapi.db",
            422,
            ("job_id", "job_0123456789abcdef"),
            operation="/v1/files",
        ),
    ),
    # -- uploads ---------------------------------------------------------------------------
    (
        "upload-not-multipart",
        Bad(
            "POST",
            "/v1/files",
            415,
            ("multipart/form-data",),
            b"raw bytes",
            {"content-type": "application/octet-stream"},
            "/v1/files",
        ),
    ),
    (
        "upload-malformed-multipart",
        Bad(
            "POST",
            "/v1/files",
            422,
            ("malformed multipart",),
            b"--b\r\nno headers here--b--\r\n",
            {"content-type": "multipart/form-data; boundary=b"},
            "/v1/files",
        ),
    ),
    (
        "upload-no-boundary",
        Bad(
            "POST",
            "/v1/files",
            422,
            ("multipart",),
            b"whatever",
            {"content-type": "multipart/form-data"},
            "/v1/files",
        ),
    ),
    *_id_cases(),
    *_raw_path_cases(),
]


def _send(server: LiveServer, bad: Bad) -> tuple[int, bytes, dict[str, str]]:
    if bad.raw:
        return _raw(server, bad)
    with server.client(timeout=60) as c:
        r = c.request(bad.method, bad.path, content=bad.body, headers=bad.headers)
        return r.status_code, r.content, dict(r.headers)


def _raw(server: LiveServer, bad: Bad) -> tuple[int, bytes, dict[str, str]]:
    url = urlsplit(server.url)
    assert url.hostname and url.port
    request = f"{bad.method} {bad.path} HTTP/1.1\r\nHost: {url.netloc}\r\nConnection: close\r\n\r\n"
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(request.encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return int(lines[0].split()[1]), body, headers


@pytest.mark.parametrize("bad", [b for _, b in MATRIX], ids=[n[:60] for n, _ in MATRIX])
def test_bad_input(server: LiveServer, openapi: dict[str, Any], bad: Bad) -> None:
    status, body, headers = _send(server, bad)
    assert status == bad.status, (status, body[:600])
    assert headers["content-type"] == "application/json", headers
    error = json.loads(body)
    assert set(error) >= {"detail"}, error
    text = json.dumps(error).lower()
    for needle in bad.needles:
        assert needle.lower() in text, (needle, error)
    if bad.operation is not None:
        responses = openapi["paths"][bad.operation][bad.method.lower()]["responses"]
        assert str(status) in responses, f"{status} is not documented for {bad.operation}"
    # Nothing of the request is echoed back in bulk (a 10 MB prompt is not returned).
    assert len(body) < 4096
    assert_healthy(server)


def test_non_finite_numbers_are_refused_where_they_are(server: LiveServer) -> None:
    with server.client() as c:
        for literal in NON_FINITE.values():
            r = c.post(GENERATE, content=caption_with(literal), headers=JSON)
            assert r.status_code == 422, r.text
            assert r.json()["detail"][0]["loc"] == ["body", "prompt", "weight"], r.text
        nested = b'{"prompt": "x", "x": {"list": [1, 2, NaN]}}'
        r = c.post(GENERATE, content=nested, headers=JSON)
        assert r.json()["detail"][0]["loc"] == ["body", "x", "list", 2], r.text
        # Nothing was queued, so no listing can trip over it.
        assert c.get("/v1/jobs").status_code == 200


def test_openai_images_refuse_what_the_body_rules_refuse(server: LiveServer) -> None:
    cases = [
        ({"prompt": STRING_BOMB, "model": "ideogram4"}, "prompt", "nested deeper than 64"),
        (b'{"prompt": "x", "model": "ideogram4", "x-weight": NaN}', "x-weight", "not finite"),
        (b'{"prompt": "x", "n": 1, "seed": 1e400}', "seed", "not finite"),
    ]
    with server.client() as c:
        for body, param, needle in cases:
            if isinstance(body, bytes):
                r = c.post("/v1/images/generations", content=body, headers=JSON)
            else:
                r = c.post("/v1/images/generations", json=body)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == param and needle in error["message"], error
    assert_healthy(server)


def test_upload_over_the_limit(server: LiveServer, openapi: dict[str, Any]) -> None:
    documented = openapi["paths"]["/v1/files"]["post"]["responses"]
    with server.client() as c:
        # Declared up front (Content-Length) and streamed (chunked, no length).
        big = c.post("/v1/files", files={"file": ("big.bin", b"\0" * (UPLOAD_LIMIT + 1))})

        def chunks() -> Iterator[bytes]:
            yield (
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.bin"'
                b"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            for _ in range(8):
                yield b"\1" * (UPLOAD_LIMIT // 4)
            yield b"\r\n--b--\r\n"

        streamed = c.post(
            "/v1/files",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        for r in (big, streamed):
            assert r.status_code == 413, r.text
            assert "KIAPI_MAX_UPLOAD_BYTES" in r.json()["detail"]
        assert "413" in documented
        # Nothing was stored.
        assert c.get("/v1/files").json()["files"] == []
    assert_healthy(server)


@pytest.mark.parametrize(
    ("rng", "status", "body"),
    [
        # Ranges that cannot be parsed are ignored (RFC 9110 14.2): the whole file.
        ("bytes=5-2", 200, b"0123456789"),
        ("items=0-1", 200, b"0123456789"),
        ("bytes=abc", 200, b"0123456789"),
        ("bytes=", 200, b"0123456789"),
        ("bytes=" + "9" * 5000 + "-", 200, b"0123456789"),
        ("bytes=" + ",".join(["0-1"] * 150), 200, b"0123456789"),  # too many to bother
        # Well-formed ones are served...
        ("bytes=3-", 206, b"3456789"),
        ("bytes=-5", 206, b"56789"),
        # ...unless they start past the end.
        ("bytes=10-", 416, None),
        ("bytes=-0", 416, None),
        ("bytes=99999999999-", 416, None),
    ],
)
def test_download_ranges(
    server: LiveServer, openapi: dict[str, Any], rng: str, status: int, body: bytes | None
) -> None:
    documented = openapi["paths"]["/v1/files/{file_id}/download"]["get"]["responses"]
    with server.client() as c:
        file_id = c.post("/v1/files", files={"file": ("digits.txt", b"0123456789")}).json()["id"]
        r = c.get(f"/v1/files/{file_id}/download", headers={"Range": rng})
        c.delete(f"/v1/files/{file_id}")
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert str(status) in documented
    if body is not None:
        assert r.content == body
    else:
        assert r.headers["content-range"] == "bytes */10"
        assert "the file has 10 bytes" in r.json()["detail"]
    assert_healthy(server)


def test_unknown_fields_are_accepted_and_ignored(server: LiveServer) -> None:
    extra = {"negative_prompt": "blurry", "n": 4, "steps": 999, "x-custom": {"nested": [1, 2]}}
    with server.client() as c:
        checked = c.post(VALIDATE, json={**P, **extra})
        r = c.post(GENERATE, json={**P, **extra, "mode": "async", "width": 256, "height": 256})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        c.delete(f"/v1/jobs/{job_id}")  # the point is the validation, not the picture
        params = wait_terminal(c, job_id)["params"]
    assert checked.status_code == 200, checked.text
    assert not set(extra) & set(params), params
    assert params["prompt"] == P["prompt"] and params["width"] == 256
    assert_healthy(server)


def test_the_server_is_healthy_after_the_matrix(server: LiveServer) -> None:
    """Valid requests still work after all of the above."""
    with server.client() as c:
        echoed = c.post("/v1/text/echo/run", json={"text": "still here"})
        assert echoed.status_code == 200 and echoed.text == "still here"
        assert c.get("/openapi.json").status_code == 200
        # No request above left a job or file behind that the listings cannot show.
        assert c.get("/v1/jobs", params={"limit": "500"}).status_code == 200
        assert c.get("/v1/files", params={"limit": "500"}).status_code == 200
        ok = c.post(VALIDATE, json={"prompt": {"high_level_description": "A red poster."}})
        assert ok.status_code == 200, ok.text
    assert_healthy(server)


def test_a_stream_of_garbage_does_not_hurt(server: LiveServer) -> None:
    """Bytes that are not HTTP at all: the connection is dropped, the server carries on."""
    url = urlsplit(server.url)
    assert url.hostname and url.port
    for junk in (b"\x00\xff" * 512 + b"\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"\r\n" * 100):
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)  # no more is coming: the server must not wait
            with contextlib.suppress(OSError):
                sock.recv(4096)
    assert_healthy(server)
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/v1/jobs").status_code == 200


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_body_of_many_values_is_refused_before_it_is_built(
    live_server: Callable[..., LiveServer],
) -> None:
    """The largest body the default limit lets in, in the shape that costs the most memory
    per byte (``[{},{},...]``: 16.5 MB of it took a server from 55 MB to 1.39 GB)."""
    server = live_server({"KIAPI_PLUGINS": "echo"})
    filler = BODY_LIMIT - 64
    body = b'{"text": "x", "junk": [' + b"{}," * (filler // 3) + b"{}]}"
    assert len(body) <= BODY_LIMIT
    with server.client() as c:
        assert c.get("/v1/jobs").status_code == 200  # warm: imports and first allocations
        before = _peak_rss_kib(server.proc.pid)
        r = c.post(ECHO, content=body, headers=JSON)
        grown_mb = (_peak_rss_kib(server.proc.pid) - before) / 1024
    # The body itself is 1 MiB (read once, maybe copied); parsed, it grew the server 82 MB.
    assert grown_mb < 16, grown_mb
    assert r.status_code == 422 and "KIAPI_MAX_JSON_VALUES" in r.text, r.text[:300]


def test_a_big_body_is_parsed_off_the_event_loop(live_server: Callable[..., LiveServer]) -> None:
    """With the limits raised so one body costs seconds of parsing, /health keeps answering."""
    server = live_server(
        {
            "KIAPI_PLUGINS": "echo",
            "KIAPI_MAX_BODY_BYTES": str(8 * 1024 * 1024),
            "KIAPI_MAX_JSON_VALUES": str(10_000_000),
        }
    )
    body = b'{"text": "x", "junk": [' + b"0," * 2_000_000 + b"0]}"
    done = threading.Event()
    took: list[float] = []

    def post() -> None:
        with server.client() as c:
            started = time.perf_counter()
            r = c.post(ECHO, content=body, headers=JSON)
            took.append(time.perf_counter() - started)
            assert r.status_code == 422, r.text[:300]  # echo forbids unknown fields
        done.set()

    health: list[float] = []
    with server.client() as c:
        c.get("/health")
        thread = threading.Thread(target=post)
        thread.start()
        while not done.is_set():
            started = time.perf_counter()
            assert c.get("/health").status_code == 200
            health.append(time.perf_counter() - started)
            time.sleep(0.01)
        thread.join()
    assert took, "the big request failed"
    # Before: the whole parse and value check ran on the loop, so /health waited all of it.
    assert len(health) >= 3 and max(health) < took[0] / 3, (max(health), took[0], len(health))
