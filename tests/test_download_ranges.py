"""Range requests on downloads, on a live server, against RFC 9110 sections 14.1.1 and 14.2:
an invalid or excessive Range is ignored (200, the whole file), unsatisfiable specs are left out
of a list, a list with none left is a 416 with ``Content-Range: bytes */size``, and the rest are
merged and served as 206."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import httpx
import pytest
from helpers import LiveServer

DATA = b"0123456789"
WHOLE = (200, [DATA])


@pytest.fixture(scope="module")
def download(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., httpx.Response]]:
    from kiapi_core.testing import start_server

    server = start_server(tmp_path_factory.mktemp("ranges"), {"KIAPI_PLUGINS": "echo"})
    try:
        with server.client() as c:
            file_id = c.post("/v1/files", files={"file": ("d.txt", DATA)}).json()["id"]
            empty_id = c.post("/v1/files", files={"file": ("e.txt", b"")}).json()["id"]

            def get(rng: str | bytes, empty: bool = False) -> httpx.Response:
                url = f"/v1/files/{empty_id if empty else file_id}/download"
                return c.get(url, headers={"Range": rng})

            yield get
        _assert_alive(server)
    finally:
        server.stop()


def _assert_alive(server: LiveServer) -> None:
    assert httpx.get(server.url + "/health").status_code == 200


def _parts(r: httpx.Response) -> list[bytes]:
    """The bodies of a 206, one per range, checked against their Content-Range."""
    ctype = r.headers["content-type"]
    if not ctype.startswith("multipart/byteranges"):
        first, last, size = _content_range(r.headers["content-range"])
        assert size == len(DATA) and r.content == DATA[first : last + 1]
        return [r.content]
    boundary = ctype.split("boundary=")[1].encode()
    parts = []
    for chunk in r.content.split(b"--" + boundary)[1:-1]:
        head, _, body = chunk.strip(b"\r\n").partition(b"\r\n\r\n")
        found = re.search(rb"Content-Range: (.+)", head, re.IGNORECASE)
        assert found, head
        first, last, size = _content_range(found.group(1).decode().strip())
        assert size == len(DATA) and body == DATA[first : last + 1]
        parts.append(body)
    return parts


def _content_range(value: str) -> tuple[int, int, int]:
    found = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", value)
    assert found, value
    first, last, size = map(int, found.groups())
    return first, last, size


@pytest.mark.parametrize(
    ("rng", "expected"),
    [
        # Invalid syntax anywhere: the Range is ignored as a whole.
        ("bytes=--1", WHOLE),
        ("bytes=-1-", WHOLE),
        ("bytes=+1-2", WHOLE),
        ("bytes=1_0-", WHOLE),
        ("bytes=1-2-3", WHOLE),
        (
            "bytes=\uff11-\uff12".encode(),
            WHOLE,
        ),  # fullwidth digits: int() takes them, HTTP does not
        ("bytes=0-1,abc", WHOLE),
        ("bytes=0-1,5-2", WHOLE),
        ("bytes=0-1,-", WHOLE),
        ("bytes=0-1,2", WHOLE),
        ("bytes=,", WHOLE),
        # Too many specs to bother with (a cap of 100), whether they are satisfiable or not.
        ("bytes=" + ",".join(f"{i % 10}-{i % 10}" for i in range(1000)), WHOLE),
        ("bytes=" + ",".join(["0-0"] * 101), WHOLE),
        ("bytes=" + ",".join(["50-"] * 1000), WHOLE),
        # Valid: unsatisfiable specs are left out of a list that has satisfiable ones.
        ("bytes=0-1,20-30", (206, [b"01"])),
        ("bytes=0-1,-0", (206, [b"01"])),
        ("bytes=10-,-3", (206, [b"789"])),
        # Merged when overlapping or adjacent, sorted; empty list elements are allowed.
        ("bytes=0-1,,2-3", (206, [b"0123"])),
        ("bytes=5-,0-6", (206, [DATA])),
        ("bytes=" + ",".join(["0-0"] * 100), (206, [b"0"])),
        ("bytes=8-9, 0-0", (206, [b"0", b"89"])),
        ("bytes=0-0,2-2,4-4", (206, [b"0", b"2", b"4"])),
        ("bytes=3-99999999999999999999999", (206, [b"3456789"])),
    ],
)
def test_ranges(
    download: Callable[..., httpx.Response], rng: str | bytes, expected: tuple[int, list[bytes]]
) -> None:
    r = download(rng)
    status, parts = expected
    assert r.status_code == status, (r.status_code, r.text[:200])
    if status == 200:
        assert r.content == DATA and "content-range" not in r.headers
    else:
        assert _parts(r) == parts


@pytest.mark.parametrize(
    "rng", ["bytes=10-", "bytes=-0", "bytes=10-,20-30,-0", "bytes=" + ",".join(["10-"] * 100)]
)
def test_unsatisfiable(download: Callable[..., httpx.Response], rng: str) -> None:
    r = download(rng)
    assert r.status_code == 416
    assert r.headers["content-range"] == "bytes */10"
    assert "the file has 10 bytes" in r.json()["detail"]


@pytest.mark.parametrize("rng", ["bytes=0-", "bytes=-5", "bytes=3-4"])
def test_an_empty_file_is_sent_whole(download: Callable[..., httpx.Response], rng: str) -> None:
    r = download(rng, empty=True)
    assert r.status_code == 200 and r.content == b""
