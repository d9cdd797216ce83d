"""An Operation declared once gives the route, its OpenAPI and the job handler's registration."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from kiapi_core import (
    ApiError,
    Capability,
    JobContext,
    Operation,
    hookimpl,
    host_of,
    json_response,
)
from kiapi_core.settings import Settings
from kiapi_core.testing import create_app, wait_for

WORDS = Capability(name="words", domain="text", title="Words", description="Says words.")
BASE = "/v1/text/words"
KEEP = "X-Kiapi-Keep-Alive"
STANDARD = {"400", "406", "409", "413", "415", "422", "429", "500", "503", "504"}


class SayRequest(BaseModel, extra="forbid"):
    text: str = Field(min_length=1, max_length=100, description="What to say.")
    format: Literal["txt", "csv"] = Field("txt", description="How the file is written.")
    refuse: Literal["no", "400", "503"] = Field("no", description="Make prepare() refuse.")
    slow_s: float = Field(0, ge=0, le=30, description="Report progress this long (for cancel).")
    mode: Literal["sync", "async"] = Field("sync", description="Wait, or 202 at once.")


class SayResult(BaseModel):
    text: str = Field(description="What was said.")
    file_id: str = Field(description="The file written.")


class CountRequest(BaseModel):
    text: str


class CountResult(BaseModel):
    count: int


def say(ctx: JobContext) -> SayResult:
    deadline = time.monotonic() + ctx.params["slow_s"]
    ctx.progress(0.1, "starting")
    while time.monotonic() < deadline:
        ctx.progress(0.5, "waiting")  # raises once canceled
        time.sleep(0.02)
    text = ctx.params["text"].upper()
    content_type = "text/csv" if ctx.params["format"] == "csv" else "text/plain"
    info = ctx.save_file(text.encode(), filename="said", content_type=content_type)
    return SayResult(text=text, file_id=info.id)


def count(ctx: JobContext) -> CountResult:
    return CountResult(count=len(ctx.params["text"]))


async def prepare_say(body: SayRequest, request: Request) -> dict[str, Any]:
    if body.refuse == "400":
        raise ApiError(400, "refused by prepare: pick another text")
    if body.refuse == "503":
        raise ApiError(503, "not now", command="kiapi activate words")
    assert host_of(request).settings.home.is_dir()  # host access from prepare
    return {"text": body.text, "format": body.format, "slow_s": body.slow_s}


SAY = Operation(
    WORDS,
    "say",
    SayRequest,
    say,
    media_types=["text/plain", "text/csv"],
    pick=lambda body: "text/csv" if body.format == "csv" else "text/plain",
    prepare=prepare_say,
    summary="Say words",
    responses={"400": "prepare() refused the text.", "418": {"description": "Never."}},
    openapi={"description": "Says it, as a job.", "x-kiapi-test": True},
    schema_overrides={"SayRequest": {"properties": {"text": {"examples": ["hello"]}}}},
)
# No mode field, no media types, a job type of its own, the result from the annotation.
COUNT = Operation(WORDS, "count", CountRequest, count, job_type="words-count")


async def _stats(request: Request) -> Response:
    return JSONResponse({"said": 0})


class WordsPlugin:
    """Two operations, plus a hand-written GET on the path of one of them."""

    def __init__(self, *operations: Operation[Any]) -> None:
        self.operations = operations or (SAY, COUNT)

    @hookimpl
    def register_operations(self, register: Callable[[Operation[Any]], None]) -> None:
        for op in self.operations:
            register(op)

    @hookimpl
    def register_routes(self) -> list[Route]:
        return [Route(f"{BASE}/say", _stats, methods=["GET"])]

    @hookimpl
    def register_openapi(self) -> dict[str, Any]:
        return {
            "paths": {f"{BASE}/say": {"get": {"responses": {"200": json_response({}, "Stats.")}}}}
        }


def _app(home: Path, *plugins: tuple[str, object], **settings: Any) -> Any:
    return create_app(Settings(home=home, plugins=[], **settings), extra_plugins=list(plugins))


@pytest.fixture
def words(home: Path) -> Iterator[TestClient]:
    with TestClient(_app(home, ("words", WordsPlugin()))) as c:
        assert c.get("/health").json()["status"] == "ok"
        yield c


def test_sync_answers_the_artifact_picked_by_the_request(words: TestClient) -> None:
    r = words.post(f"{BASE}/say", json={"text": "hi"})
    assert r.status_code == 200 and r.text == "HI"
    assert r.headers["content-type"].startswith("text/plain")
    job = words.get(f"/v1/jobs/{r.headers['x-kiapi-job-id']}").json()
    assert job["result"] == {"text": "HI", "file_id": r.headers["x-kiapi-file-id"]}
    assert job["params"] == {"text": "hi", "format": "txt", "slow_s": 0}  # what prepare gave
    csv = words.post(f"{BASE}/say", json={"text": "a,b", "format": "csv"})
    assert csv.headers["content-type"].startswith("text/csv") and csv.text == "A,B"


def test_sync_json_and_async(words: TestClient) -> None:
    job = words.post(
        f"{BASE}/say", json={"text": "hi"}, headers={"accept": "application/json"}
    ).json()
    assert job["status"] == "succeeded" and job["type"] == "words"
    assert job["result"]["text"] == "HI" and job["progress"] == 1.0
    queued = words.post(f"{BASE}/say", json={"text": "later", "mode": "async"})
    assert queued.status_code == 202 and queued.headers["location"].startswith("/v1/jobs/")
    url = f"/v1/jobs/{queued.json()['job_id']}"
    wait_for(lambda: words.get(url).json()["status"] == "succeeded")
    assert words.get(url).json()["result"]["text"] == "LATER"
    assert (
        words.post(f"{BASE}/say", json={"text": "x"}, headers={"accept": "image/png"}).status_code
        == 406
    )


def test_an_operation_without_mode_or_media_types_answers_the_job(words: TestClient) -> None:
    r = words.post(f"{BASE}/count", json={"text": "four"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["type"] == "words-count" and r.json()["result"] == {"count": 4}
    # No `mode` field: a "mode" in the body is no switch, just data the model does not know.
    assert words.post(f"{BASE}/count", json={"text": "a", "mode": "async"}).status_code == 200


def test_cancel_stops_a_running_job(words: TestClient) -> None:
    queued = words.post(f"{BASE}/say", json={"text": "hi", "slow_s": 20, "mode": "async"})
    url = f"/v1/jobs/{queued.json()['job_id']}"
    wait_for(lambda: words.get(url).json()["progress_label"] == "waiting")
    assert words.delete(url).status_code in (200, 202)
    wait_for(lambda: words.get(url).json()["status"] == "canceled")
    assert words.get(url).json()["artifacts"] == []


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"text": "hi", "refuse": "400"}, 400, "refused by prepare: pick another text"),
        ({"text": "hi", "refuse": "503"}, 503, "not now"),
        ({"text": ""}, 422, None),
        ({"text": "hi", "surprise": 1}, 422, None),
    ],
)
def test_refusals_are_4xx_json_before_any_job(
    words: TestClient, body: dict[str, Any], status: int, detail: str | None
) -> None:
    before = len(words.get("/v1/jobs").json()["jobs"])
    r = words.post(f"{BASE}/say", json=body)
    assert r.status_code == status
    if detail is not None:
        assert r.json()["detail"] == detail
    else:
        assert r.json()["detail"][0]["loc"][0] == "body"
    if status == 503:
        assert r.json()["command"] == "kiapi activate words"
    assert len(words.get("/v1/jobs").json()["jobs"]) == before
    assert (
        words.post(
            f"{BASE}/say", content=b"text", headers={"content-type": "text/plain"}
        ).status_code
        == 415
    )


def test_the_handlers_and_capability_are_registered(words: TestClient) -> None:
    plugin = words.app.state.kiapi.registry.plugins["words"].as_dict()  # type: ignore[attr-defined]
    assert set(words.app.state.kiapi.registry.handlers) >= {"words", "words-count"}  # type: ignore[attr-defined]
    assert plugin["job_types"] == ["words", "words-count"]
    assert plugin["capabilities"] == ["text/words"]
    assert plugin["hooks"] == ["register_openapi", "register_operations", "register_routes"]
    assert {"/v1/text/words/say", "/v1/text/words/count"} <= set(plugin["paths"])
    # The hand-written GET next to the operation's POST, on the same path.
    assert words.get(f"{BASE}/say").json() == {"said": 0}


def test_the_openapi_is_generated_and_valid(words: TestClient) -> None:
    doc = words.get("/openapi.json").json()
    validate(doc, cls=OpenAPIV31SpecValidator)
    capability = words.get(f"{BASE}/openapi.json").json()
    validate(capability, cls=OpenAPIV31SpecValidator)
    assert capability["x-kiapi-capability"] == "words"
    item = doc["paths"][f"{BASE}/say"]
    assert set(item) == {"post", "get"}
    op = item["post"]
    assert op["summary"] == "Say words" and op["description"] == "Says it, as a job."
    assert op["operationId"] == "say_v1_text_words_say_post" and op["x-kiapi-test"] is True
    assert op["tags"] == ["words"]
    assert op["parameters"][0]["name"] == "Accept"
    assert op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SayRequest"
    }
    ok = op["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/SayJob"}
    assert set(ok["content"]) == {"application/json", "text/plain", "text/csv"}
    assert set(ok["headers"]) == {"X-Kiapi-File-Id", "X-Kiapi-Job-Id", "Idempotent-Replayed"}
    # The submit headers every job-running operation takes (docs/jobs.md), by name.
    refs = [r["$ref"].rsplit("/", 1)[1] for r in op["x-kiapi-submit-headers"]]
    assert refs == [
        *["Idempotency-Key", "Prefer", "Cancel-After", "X-Kiapi-Priority"],
        *["X-Kiapi-Webhook", "X-Kiapi-Webhook-Events"],
        KEEP,
    ]
    assert set(doc["components"]["parameters"]) >= set(refs)
    assert op["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/AsyncJobResponse"
    }
    assert set(op["responses"]) >= STANDARD
    for code in STANDARD:
        assert op["responses"][code]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }
    assert op["responses"]["400"]["description"] == "prepare() refused the text."
    assert op["responses"]["418"] == {"description": "Never."}
    assert "401" not in op["responses"]
    schemas = doc["components"]["schemas"]
    job = schemas["SayJob"]["properties"]["result"]
    assert {"$ref": "#/components/schemas/SayResult"} in job["anyOf"]
    assert schemas["SayRequest"]["properties"]["text"]["examples"] == ["hello"]
    assert schemas["SayRequest"]["properties"]["text"]["maxLength"] == 100
    count = doc["paths"][f"{BASE}/count"]["post"]
    # Without a mode it is sync only, but Prefer can still make it answer 202 with the Job.
    assert count["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/AcceptedJob"
    }
    assert "parameters" not in count
    assert set(count["responses"]["200"]["content"]) == {"application/json"}
    assert schemas["CountJob"]["properties"]["result"]["anyOf"][0] == {
        "$ref": "#/components/schemas/CountResult"
    }


def test_with_auth_on_the_operation_documents_401(home: Path) -> None:
    with TestClient(_app(home, ("words", WordsPlugin()), api_key="k" * 32)) as c:
        headers = {"authorization": "Bearer " + "k" * 32}
        doc = c.get("/openapi.json", headers=headers).json()
        assert "401" in doc["paths"][f"{BASE}/say"]["post"]["responses"]
        assert c.post(f"{BASE}/count", json={"text": "a"}).status_code == 401
        assert c.post(f"{BASE}/count", json={"text": "a"}, headers=headers).status_code == 200


def test_a_changed_declaration_is_served_not_a_cached_one(home: Path, tmp_path: Path) -> None:
    # The generated fragment is cached between starts: the declaration is part of its key.
    for summary in ("First words", "Second words"):
        op = Operation(WORDS, "count", CountRequest, count, summary=summary)
        app = _app(tmp_path / summary, ("words", WordsPlugin(op)))
        assert app.state.kiapi.openapi()["paths"][f"{BASE}/count"]["post"]["summary"] == summary
        app.state.kiapi.db.close()


def test_a_colliding_operation_refuses_the_later_plugin_naming_both(home: Path) -> None:
    app = _app(home, ("words", WordsPlugin()), ("copycat", WordsPlugin(COUNT)))
    info = app.state.kiapi.registry.plugins["copycat"]
    assert info.status == "failed"
    assert any("already registered by plugin 'words'" in e for e in info.errors), info.errors
    app.state.kiapi.db.close()


def test_two_handlers_for_one_job_type_refuse_the_plugin(home: Path) -> None:
    same_type = Operation(WORDS, "count2", CountRequest, say, job_type="words-count")
    app = _app(home, ("words", WordsPlugin(COUNT, same_type)))
    info = app.state.kiapi.registry.plugins["words"]
    assert info.status == "failed"
    assert any(
        "job type 'words-count': operations give different handlers" in e for e in info.errors
    )
    app.state.kiapi.db.close()


def test_operations_may_share_a_job_type_and_its_handler(home: Path) -> None:
    alias = Operation(WORDS, "count-again", CountRequest, count, job_type="words-count")
    with TestClient(_app(home, ("words", WordsPlugin(COUNT, alias)))) as c:
        assert c.post(f"{BASE}/count-again", json={"text": "ab"}).json()["result"] == {"count": 2}


def test_an_operation_of_another_version_of_a_registered_capability_fails_the_plugin(
    home: Path,
) -> None:
    class Registers(WordsPlugin):
        @hookimpl
        def register_capabilities(self, register: Callable[[Capability], None]) -> None:
            register(Capability(name="words", domain="text", title="Other words"))

    app = _app(home, ("words", Registers(COUNT)))
    errors = app.state.kiapi.registry.plugins["words"].errors
    assert any("its Capability differs from" in e for e in errors), errors
    app.state.kiapi.db.close()


def test_a_single_media_type_may_be_a_string() -> None:
    op = Operation(WORDS, "count", CountRequest, count, media_types="text/plain", tags="a")
    assert op.media_types == ("text/plain",) and op.tags == ("a",)


def test_a_schema_override_naming_nothing_generated_fails_the_plugin(home: Path) -> None:
    bad = Operation(WORDS, "count", CountRequest, count, schema_overrides={"Nope": {}})
    app = _app(home, ("words", WordsPlugin(bad)))
    info = app.state.kiapi.registry.plugins["words"]
    assert info.status == "failed"
    assert any("schema_overrides names 'Nope'" in e for e in info.errors), info.errors
    assert app.state.kiapi.registry.handlers.get("words") is None  # all or nothing
    app.state.kiapi.db.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": "/say"}, "path must be relative"),
        ({"method": "GET"}, "method must be one of"),
        ({"media_types": ["text/plain", "text/csv"]}, "need pick(body)"),
        ({"media_types": ["application/json"]}, "other than JSON"),
        ({"handler": lambda ctx: {}}, "give result="),
        ({"job_type": "Not A Slug"}, "job_type must match"),
        ({"responses": {"2xx": "no"}}, "not a status code"),
    ],
)
def test_a_wrong_declaration_is_refused_when_made(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {
        "capability": WORDS,
        "path": "count",
        "request": CountRequest,
        "handler": count,
    }
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Operation(**{**args, **kwargs})


def test_the_handler_may_return_the_result_model_or_a_dict() -> None:
    ctx: Any = type("Ctx", (), {"params": {"text": "abc"}})()
    assert COUNT.job_handler(ctx) == {"count": 3}
    plain = Operation(WORDS, "x", CountRequest, lambda c: {"count": 1}, result=CountResult)
    assert plain.job_handler(ctx) == {"count": 1}
