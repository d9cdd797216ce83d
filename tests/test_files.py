"""/v1/files over HTTP, atomic writes, start-up cleanup, id validation, retention."""

from __future__ import annotations

import hashlib
import http.client
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
from starlette.testclient import TestClient

from kiapi_core.app import create_app
from kiapi_core.files.store import FileStore, FileTooLarge, clean_filename
from kiapi_core.settings import Settings
from kiapi_core.state.sqlite import Database
from kiapi_core.testing import wait_for

FILE_ID = re.compile(r"^file_[0-9a-f]{16}$")
INFO_FIELDS = {"id", "filename", "content_type", "bytes", "sha256", "created_at", "job_id"}
ECHO = "/v1/text/echo/run"


@contextmanager
def app_client(make_settings: Callable[..., Settings], **overrides: Any) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(**overrides))) as c:
        yield c


def upload(
    c: TestClient,
    data: bytes,
    filename: str = "data.bin",
    content_type: str = "application/octet-stream",
) -> dict[str, Any]:
    r = c.post("/v1/files", files={"file": (filename, data, content_type)})
    assert r.status_code == 201, r.text
    info: dict[str, Any] = r.json()
    return info


def validator(c: TestClient, name: str) -> jsonschema.Draft202012Validator:
    doc = c.get("/openapi.json").json()
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    )


def on_disk(home: Path, sub: str) -> list[str]:
    return sorted(p.name for p in (home / "files" / sub).iterdir())


# -- upload ---------------------------------------------------------------------------------
def test_upload_and_metadata(client: TestClient, home: Path) -> None:
    data = b"hello, files\n" * 1000
    before = time.time()
    r = client.post("/v1/files", files={"file": ("notes.txt", data, "text/plain")})
    assert r.status_code == 201
    info = r.json()
    validator(client, "FileInfo").validate(info)
    assert set(info) == INFO_FIELDS
    assert FILE_ID.fullmatch(info["id"])
    assert info["filename"] == "notes.txt"
    assert info["content_type"] == "text/plain"
    assert info["bytes"] == len(data)
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert before - 1 <= info["created_at"] <= time.time() + 1
    assert info["job_id"] is None
    assert r.headers["location"] == f"/v1/files/{info['id']}"
    assert client.get(f"/v1/files/{info['id']}").json() == info
    # Atomic write: the blob is in place under its id, nothing is left in tmp.
    assert on_disk(home, "blobs") == [info["id"]]
    assert on_disk(home, "tmp") == []
    assert (home / "files" / "blobs" / info["id"]).read_bytes() == data


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("../../evil.txt", "evil.txt"),
        ("/etc/passwd", "passwd"),
        ("C:\\Windows\\win.ini", "win.ini"),
        ('a"b;c\r\nd<>|.png', None),  # the client may percent-encode some of these first
        ("..", "file"),
        ("café ünïcode.txt", "café ünïcode.txt"),
    ],
)
def test_upload_filename_is_only_a_label(
    client: TestClient, home: Path, given: str, stored: str | None
) -> None:
    info = upload(client, b"x", filename=given)
    if stored is not None:
        assert info["filename"] == stored
    assert re.fullmatch(r"[\w. -]+", info["filename"]), info["filename"]
    assert not info["filename"].startswith(".")
    # It never became a path: only the blob named by the id exists.
    assert on_disk(home, "blobs") == [info["id"]]
    r = client.get(f"/v1/files/{info['id']}/download")
    assert r.status_code == 200 and r.content == b"x"


def test_clean_filename() -> None:
    assert clean_filename("../../a.txt") == "a.txt"
    assert clean_filename("") == "file"
    assert clean_filename(None, fallback="image.png") == "image.png"
    assert clean_filename("\x00\x1b[31m.png") == "_31m.png"
    assert len(clean_filename("a" * 1000)) == 200


def test_upload_needs_multipart_with_a_file_field(client: TestClient) -> None:
    r = client.post("/v1/files", content=b"raw", headers={"Content-Type": "application/json"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = client.post("/v1/files", data={"other": "x"}, files={"notfile": ("a", b"a")})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "file"]
    assert client.get("/v1/files").json()["files"] == []


def test_upload_limit_is_413(make_settings: Callable[..., Settings], home: Path) -> None:
    with app_client(make_settings, max_upload_bytes=10_000) as c:
        assert upload(c, b"a" * 5_000)["bytes"] == 5_000
        r = c.post("/v1/files", files={"file": ("big.bin", b"b" * 20_000)})
        assert r.status_code == 413
        assert "KIAPI_MAX_UPLOAD_BYTES" in r.json()["detail"]

        # Without Content-Length (chunked), the limit applies while the body streams in.
        boundary = "kiapiboundary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="big.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            + b"c" * 20_000
            + f"\r\n--{boundary}--\r\n".encode()
        )
        chunks = [body[i : i + 4096] for i in range(0, len(body), 4096)]
        r = c.post(
            "/v1/files",
            content=iter(chunks),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert r.status_code == 413, r.text
        assert len(c.get("/v1/files").json()["files"]) == 1
        assert len(on_disk(home, "blobs")) == 1
        assert on_disk(home, "tmp") == []


# -- list -----------------------------------------------------------------------------------
def test_list_pages_newest_first_and_filters_by_job(client: TestClient) -> None:
    ids = [upload(client, f"{i}".encode(), filename=f"f{i}.txt")["id"] for i in range(5)]
    job = client.post(
        ECHO,
        json={"text": "artifact", "steps": 1, "delay_s": 0},
        headers={"Accept": "application/json"},
    ).json()
    artifact = job["artifacts"][0]
    newest_first = [artifact, *reversed(ids)]

    listing = client.get("/v1/files").json()
    validator(client, "FileList").validate(listing)
    assert [f["id"] for f in listing["files"]] == newest_first
    assert listing["next_cursor"] is None

    seen: list[str] = []
    params: dict[str, Any] = {"limit": 4}
    while True:
        page = client.get("/v1/files", params=params).json()
        assert len(page["files"]) <= 4
        seen += [f["id"] for f in page["files"]]
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert seen == newest_first

    by_job = client.get("/v1/files", params={"job_id": job["id"]}).json()["files"]
    assert [f["id"] for f in by_job] == [artifact]
    assert by_job[0]["job_id"] == job["id"] and by_job[0]["filename"] == "echo.txt"
    unknown = client.get("/v1/files", params={"job_id": "job_0123456789abcdef"}).json()
    assert unknown["files"] == []

    for bad in (
        {"job_id": "../x"},
        {"job_id": "file_0123456789abcdef"},
        {"limit": "0"},
        {"limit": "²"},
        {"cursor": "x"},
        {"cursor": "1" * 19},
    ):
        r = client.get("/v1/files", params=bad)
        assert r.status_code == 422, bad
        assert r.json()["detail"][0]["loc"][0] == "query"


# -- download -------------------------------------------------------------------------------
def test_download_headers_etag_range(client: TestClient) -> None:
    data = bytes(range(256)) * 20_000  # ~5 MB: several chunks
    info = upload(client, data, filename="blob.bin", content_type="application/x-test")
    url = f"/v1/files/{info['id']}/download"
    etag = f'"{info["sha256"]}"'

    digest = hashlib.sha256()
    chunks = 0
    with client.stream("GET", url) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-test"
        assert r.headers["content-length"] == str(len(data))
        assert r.headers["content-disposition"] == 'attachment; filename="blob.bin"'
        assert r.headers["etag"] == etag
        assert r.headers["accept-ranges"] == "bytes"
        assert r.headers["x-kiapi-file-id"] == info["id"]
        assert r.headers["x-content-type-options"] == "nosniff"
        for chunk in r.iter_raw():
            digest.update(chunk)
            chunks += 1
    assert digest.hexdigest() == info["sha256"]
    assert chunks > 1  # streamed, not one big body

    for inm in (etag, f'"other", {etag}', f"W/{etag}", "*"):
        r = client.get(url, headers={"If-None-Match": inm})
        assert r.status_code == 304, inm
        assert r.content == b"" and r.headers["etag"] == etag
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200

    r = client.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206
    assert r.content == data[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
    r = client.get(url, headers={"Range": "bytes=-5"})
    assert r.status_code == 206 and r.content == data[-5:]
    r = client.get(url, headers={"Range": "bytes=0-3", "If-Range": etag})
    assert r.status_code == 206 and r.content == data[:4]
    r = client.get(url, headers={"Range": "bytes=0-3", "If-Range": '"stale"'})
    assert r.status_code == 200 and len(r.content) == len(data)
    r = client.get(url, headers={"Range": f"bytes={len(data) + 10}-"})
    assert r.status_code == 416

    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(data))


def test_download_unicode_name(client: TestClient) -> None:
    info = upload(client, b"u", filename="café.txt", content_type="text/plain")
    r = client.get(f"/v1/files/{info['id']}/download")
    assert r.status_code == 200
    cd = r.headers["content-disposition"]
    assert cd.startswith('attachment; filename="caf_.txt"')
    assert "filename*=utf-8''caf%C3%A9.txt" in cd


def test_download_of_a_job_artifact(client: TestClient) -> None:
    r = client.post(ECHO, json={"text": "from a job", "steps": 1, "delay_s": 0})
    file_id = r.headers["x-kiapi-file-id"]
    info = client.get(f"/v1/files/{file_id}").json()
    assert info["job_id"] == r.headers["x-kiapi-job-id"] and info["bytes"] == len(b"from a job")
    d = client.get(f"/v1/files/{file_id}/download")
    assert d.content == b"from a job" and d.headers["content-type"].startswith("text/plain")


# -- delete ---------------------------------------------------------------------------------
def test_delete(client: TestClient, home: Path) -> None:
    keep = upload(client, b"keep")
    gone = upload(client, b"gone")
    r = client.delete(f"/v1/files/{gone['id']}")
    assert r.status_code == 200 and r.json() == {"id": gone["id"], "deleted": True}
    for method, suffix in (("GET", ""), ("GET", "/download"), ("DELETE", "")):
        r = client.request(method, f"/v1/files/{gone['id']}{suffix}")
        assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert on_disk(home, "blobs") == [keep["id"]]
    assert [f["id"] for f in client.get("/v1/files").json()["files"]] == [keep["id"]]


# -- ids never reach the disk ---------------------------------------------------------------
# Literal "." and ".." segments are normalised away by the client; the live test sends them raw.
BAD_IDS = [
    "...",
    "%2e%2e",
    "%2E%2E%2F..%2Fkiapi.db",
    "..%2f..%2fkiapi.db",
    "..%5c..%5csecret",
    "%2fetc%2fpasswd",
    "%252e%252e%252f",
    "file_0123456789abcdef%00",
    "file_%00",
    "file_0123456789abcdef%2f..",
    "file_0123456789ABCDEF",
    "file_0123456789abcde",
    "file_0123456789abcdef0",
    "job_0123456789abcdef",
    "file_0123456789abcdeg",
    "file_0123456789abcdef%0a",
    "f" * 300,
    "file_" + "0" * 5000,
    "secret",
    "blobs",
]


@pytest.mark.parametrize("file_id", BAD_IDS)
def test_bad_ids_are_404(client: TestClient, file_id: str) -> None:
    for method, suffix in (("GET", ""), ("GET", "/download"), ("DELETE", "")):
        r = client.request(method, f"/v1/files/{file_id}{suffix}")
        assert r.status_code == 404, (method, file_id, suffix, r.status_code)
        assert r.headers["content-type"] == "application/json"
        assert "detail" in r.json()


def test_bad_ids_raw_on_a_live_server(live_server: Callable[..., Any]) -> None:
    """Raw request lines (no client-side normalisation) against uvicorn: nothing leaks."""
    server = live_server({"KIAPI_PLUGINS": "echo"})
    secret = b"TOP-SECRET-CONTENT"
    (server.home / "secret").write_bytes(secret)
    (server.home / "files" / "secret").write_bytes(secret)
    with server.client() as c:
        real = c.post("/v1/files", files={"file": ("a.txt", b"real")}).json()["id"]
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    targets = [
        "/v1/files/../secret",
        "/v1/files/../../secret",
        "/v1/files/..%2f..%2fsecret",
        "/v1/files/%2e%2e%2f%2e%2e%2fsecret/download",
        "/v1/files/..%2Fsecret/download",
        "/v1/files/%2e%2e/download",
        "/v1/files/../kiapi.db/download",
        f"/v1/files/{real}/../../secret",
        f"/v1/files/{real}%2f..%2f..%2fsecret/download",
        "/v1/files//etc/passwd/download",
        "/v1/files/%2Fetc%2Fpasswd/download",
        f"/v1/files/{server.home}/secret/download",
        "/v1/files/file_0123456789abcdef%00/download",
        "/v1/files/%00/download",
        "/v1/files/..%5c..%5csecret/download",
        "/v1/files/" + "a" * 4000 + "/download",
        "/v1/jobs/../../secret",
        "/v1/jobs/%2e%2e%2fsecret",
        "/v1/jobs/job_0123456789abcdef%00",
        "/v1/files/blobs/download",
        "/v1/files/secret/download",
        "/v1/files/./download",
        "/v1/files/../download",
        "/v1/files/.../download",
    ]
    for target in targets:
        conn = http.client.HTTPConnection(host or "127.0.0.1", port, timeout=10)
        try:
            conn.putrequest("GET", target, skip_accept_encoding=True)
            conn.endheaders()
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        assert secret not in body, target
        assert b"SQLite format" not in body, target
        assert resp.status in (400, 404), (target, resp.status, body[:200])
        if resp.status == 404:
            assert resp.getheader("content-type") == "application/json", target
    with server.client() as c:
        assert c.get(f"/v1/files/{real}/download").content == b"real"


# -- atomic writes and start-up cleanup ------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> Iterator[FileStore]:
    db = Database(tmp_path / "kiapi.db")
    yield FileStore(tmp_path / "files", db)
    db.close()


def test_failed_write_leaves_nothing(store: FileStore) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"a" * 1000
        yield b"b" * 1000
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        store.put_chunks(chunks(), filename="x.bin", content_type="application/octet-stream")
    assert store.list()[0] == []
    assert list(store.blobs.iterdir()) == [] and list(store.tmp.iterdir()) == []

    with pytest.raises(FileTooLarge):
        store.put_chunks(
            iter([b"a" * 600, b"b" * 600]), filename="x", content_type="a/b", max_bytes=1000
        )
    assert store.list()[0] == []
    assert list(store.blobs.iterdir()) == [] and list(store.tmp.iterdir()) == []

    ok = store.put_chunks(
        iter([b"a" * 600, b"b" * 400]), filename="x", content_type="a/b", max_bytes=1000
    )
    assert ok.bytes == 1000 and [p.name for p in store.blobs.iterdir()] == [ok.id]


def test_failed_metadata_write_leaves_no_blob(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3
    from contextlib import contextmanager as cm

    @cm
    def broken() -> Iterator[Any]:
        raise sqlite3.OperationalError("database is locked")
        yield

    monkeypatch.setattr(store.db, "transaction", broken)
    with pytest.raises(sqlite3.OperationalError):
        store.put_bytes(b"data", filename="x", content_type="a/b")
    monkeypatch.undo()
    assert store.list()[0] == []
    assert list(store.blobs.iterdir()) == [] and list(store.tmp.iterdir()) == []


def test_orphans_are_removed_at_start(make_settings: Callable[..., Settings], home: Path) -> None:
    with app_client(make_settings) as c:
        keep = upload(c, b"keep me")
        lost = upload(c, b"blob deleted behind our back")
    files = home / "files"
    (files / "tmp" / "tmpabc123.part").write_bytes(b"half a write")
    (files / "blobs" / "file_00000000deadbeef").write_bytes(b"no row")
    (files / "blobs" / "stray-name").write_bytes(b"not even an id")
    (files / "blobs" / lost["id"]).unlink()

    with app_client(make_settings) as c:
        assert on_disk(home, "tmp") == []
        assert on_disk(home, "blobs") == [keep["id"]]
        listed = [f["id"] for f in c.get("/v1/files").json()["files"]]
        assert listed == [keep["id"]]
        assert c.get(f"/v1/files/{lost['id']}").status_code == 404
        assert c.get(f"/v1/files/{keep['id']}/download").content == b"keep me"


# -- retention -------------------------------------------------------------------------------
def test_retention_sweep_deletes_old_files(
    make_settings: Callable[..., Settings], home: Path
) -> None:
    with app_client(make_settings, files_ttl_s=0.5, sweep_interval_s=0.2) as c:
        old = upload(c, b"short-lived")
        wait_for(lambda: c.get(f"/v1/files/{old['id']}").status_code == 404, timeout=15)
        assert c.get(f"/v1/files/{old['id']}/download").status_code == 404
        assert c.get("/v1/files").json()["files"] == []
        assert on_disk(home, "blobs") == []


def test_retention_keeps_young_files(store: FileStore) -> None:
    a = store.put_bytes(b"a", filename="a", content_type="a/b")
    b = store.put_bytes(b"b", filename="b", content_type="a/b")
    now = time.time()
    assert store.sweep_expired(0, now=now + 10_000) == 0  # 0 = keep forever
    assert store.sweep_expired(60, now=now) == 0
    with store.db.transaction() as conn:
        conn.execute("UPDATE files SET created_at = ? WHERE id = ?", (now - 120, a.id))
    assert store.sweep_expired(60, now=now) == 1
    assert store.get(a.id) is None and not (store.blobs / a.id).exists()
    assert store.get(b.id) is not None and (store.blobs / b.id).exists()


# -- hostile names and types -----------------------------------------------------------------
def test_an_overlong_upload_filename_is_a_422_not_a_reset(live_server: Callable[..., Any]) -> None:
    server = live_server({"KIAPI_PLUGINS": "echo"})
    with server.client() as c:
        # 70 KB of name ahead of 4 MB of data: the answer is read, not a connection reset.
        r = c.post("/v1/files", files={"file": ("n" * 70_000 + ".bin", b"d" * 4_000_000)})
        assert r.status_code == 422, r.text
        (err,) = r.json()["detail"]
        assert err["loc"] == ["body", "file", "filename"] and "1024 bytes" in err["msg"], err
        # At the limit it is stored (the label is cleaned to 200 characters).
        ok = c.post("/v1/files", files={"file": ("n" * 1020 + ".bin", b"d")})
        assert ok.status_code == 201, ok.text
        assert c.get("/v1/files").json()["files"][0]["id"] == ok.json()["id"]
    assert list((server.home / "files" / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    "content_type", ["image/png\r\nX-Evil: 1", "image/png\nX-Evil: 1", "image/png\x00", "png", ""]
)
def test_a_content_type_that_is_not_a_media_type_is_refused_at_save(
    store: FileStore, content_type: str
) -> None:
    with pytest.raises(ValueError, match="is not a media type"):
        store.put_bytes(b"\x89PNG", filename="a.png", content_type=content_type)
    assert store.list()[0] == []
    assert list(store.blobs.iterdir()) == [] and list(store.tmp.iterdir()) == []
    fine = store.put_bytes(b"x", filename="a.txt", content_type='text/plain; charset="utf-8"')
    assert fine.content_type == 'text/plain; charset="utf-8"'


def test_an_upload_part_type_that_is_not_a_media_type_is_a_422(client: TestClient) -> None:
    r = client.post("/v1/files", files={"file": ("a.bin", b"data", "not a type")})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "file", "content_type"]
    assert client.get("/v1/files").json()["files"] == []
