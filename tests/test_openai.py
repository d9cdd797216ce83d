"""POST /v1/images/generations and GET /v1/models, as the official `openai` client sees them.

The host's side (parsing, model choice, one job per image, b64_json/url, errors in OpenAI's
envelope, queue, timeout) runs against a throwaway in-process image plugin that draws solid
colours in milliseconds; the real ideogram4 path is in plugins/ideogram4/tests.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from PIL import Image
from starlette.testclient import TestClient

from kiapi_core import Capability, ModelSpec, Weights, hookimpl
from kiapi_core.app import create_app
from kiapi_core.images import ImageGenerator, ImageParamError, ImageRequest
from kiapi_core.jobs.context import JobContext
from kiapi_core.settings import Settings

IMAGES = "/v1/images/generations"
KEY = "kiapi-openai-test-key-0123"


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A solid-colour PNG from the standard library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = (b"\x00" + bytes(rgb) * width) * height
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def colour(seed: int) -> tuple[int, int, int]:
    return (seed % 256, seed * 7 % 256, 99)


class Pixels:
    """An image plugin: one family, a free model and a gated one, solid-colour PNG jobs."""

    FREE = ModelSpec(
        name="px-1",
        family="pixels",
        domain="image",
        load=lambda weights, options: object(),
        aliases=("pixels-fast",),
        default=True,
    )
    GATED = ModelSpec(
        name="px-gated",
        family="pixels",
        domain="image",
        load=lambda weights, options: object(),
        weights=Weights(source="nowhere/px", download=lambda: Path("/nonexistent"), validate=print),
    )

    def __init__(self) -> None:
        self.requests: list[ImageRequest] = []

    def prepare(self, request: ImageRequest) -> list[dict[str, Any]]:
        self.requests.append(request)
        if request.output_format != "png":
            raise ImageParamError("output_format", "pixels draws png only")
        width, height = request.width or 16, request.height or 16
        if not (8 <= width <= 256 and 8 <= height <= 256):
            raise ImageParamError("size", f"size: pixels draws 8..256 a side, not {width}x{height}")
        first = request.seed if request.seed is not None else 1000
        extra = dict(request.extra)
        return [
            {
                "width": width,
                "height": height,
                "seed": first + i,
                "model": request.model.name,
                "delay_s": float(extra.get("delay_s", 0)),
                "fail": i in extra.get("fail", []),
            }
            for i in range(request.n)
        ]

    @staticmethod
    def run(ctx: JobContext) -> dict[str, Any]:
        p = ctx.params
        deadline = time.monotonic() + p["delay_s"]
        while time.monotonic() < deadline:
            ctx.progress(0.5, "drawing")  # raises when canceled
            time.sleep(0.02)
        if p["fail"]:
            raise RuntimeError("pixels was asked to fail")
        data = png(p["width"], p["height"], colour(p["seed"]))
        info = ctx.save_file(data, filename=f"px-{p['seed']}.png", content_type="image/png")
        return {"file_id": info.id, "seed": p["seed"]}

    @hookimpl
    def register_capabilities(self, register: Callable[[Capability], None]) -> None:
        register(Capability(name="pixels", domain="image", title="Pixels"))

    @hookimpl
    def register_models(self, register: Callable[[ModelSpec], None]) -> None:
        register(self.FREE)
        register(self.GATED)

    @hookimpl
    def register_job_handlers(self, register: Callable[[str, Any], None]) -> None:
        register("pixels", self.run)

    @hookimpl
    def register_image_generators(self, register: Callable[[ImageGenerator], None]) -> None:
        register(ImageGenerator(family="pixels", job_type="pixels", prepare=self.prepare))


@pytest.fixture
def pixels() -> Pixels:
    return Pixels()


@pytest.fixture
def make_client(
    make_settings: Callable[..., Settings], pixels: Pixels
) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        app = create_app(
            make_settings(**{"plugins": [], **overrides}), extra_plugins=[("pixels", pixels)]
        )
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def live(make_settings: Callable[..., Settings], pixels: Pixels) -> Iterator[str]:
    """The app on a real socket (uvicorn in a thread), for the openai client."""
    app = create_app(make_settings(plugins=[]), extra_plugins=[("pixels", pixels)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def openai_client(url: str, key: str = "unused") -> openai.OpenAI:
    # No retries: a retried 5xx would submit the images again and hide what happened.
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def jobs_of(url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{url}/v1/jobs?limit=100").json()["jobs"])


# -- the official client ---------------------------------------------------------------------
def test_b64_json_with_n_2_runs_two_jobs_with_distinct_seeds(live: str) -> None:
    result = openai_client(live).images.generate(
        model="pixels",
        prompt="two squares",
        n=2,
        size="48x32",
        response_format="b64_json",
        extra_body={"seed": 10},
    )
    assert isinstance(result.created, int) and abs(result.created - time.time()) < 60
    assert result.data is not None and len(result.data) == 2
    images = [decode(item.b64_json or "") for item in result.data]
    assert [im.size for im in images] == [(48, 32), (48, 32)]
    assert [im.convert("RGB").getpixel((0, 0)) for im in images] == [colour(10), colour(11)]
    assert [item.revised_prompt for item in result.data] == ["two squares", "two squares"]
    assert all(item.url is None for item in result.data)
    extra = result.model_extra or {}
    assert extra["model"] == "pixels/px-1" and result.output_format == "png"
    job_ids = extra["kiapi_job_ids"]
    assert len(set(job_ids)) == 2
    for job_id, seed in zip(job_ids, (10, 11), strict=True):
        job = httpx.get(f"{live}/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded" and job["params"]["seed"] == seed


def test_url_answers_absolute_download_urls_of_the_files_api(live: str) -> None:
    result = openai_client(live).images.generate(
        model="pixels/px-1", prompt="a square", size="16x16", response_format="url"
    )
    assert result.data is not None and len(result.data) == 1
    item = result.data[0]
    assert item.b64_json is None and item.url is not None
    file_id = (item.model_extra or {})["kiapi_file_id"]
    assert item.url == f"{live}/v1/files/{file_id}/download"
    download = httpx.get(item.url)
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(download.content)).size == (16, 16)


@pytest.mark.parametrize(
    ("kwargs", "error", "param", "code"),
    [
        ({"size": "64"}, openai.BadRequestError, "size", "invalid_value"),
        ({"size": "1024x1024"}, openai.BadRequestError, "size", "invalid_value"),  # the plugin
        ({"n": 5}, openai.BadRequestError, "n", "invalid_value"),
        ({"n": 0}, openai.BadRequestError, "n", "invalid_value"),
        ({"output_format": "webp"}, openai.BadRequestError, "output_format", "invalid_value"),
        ({"output_format": "gif"}, openai.BadRequestError, "output_format", "invalid_value"),
        ({"quality": "max"}, openai.BadRequestError, "quality", "invalid_value"),
        ({"response_format": "html"}, openai.BadRequestError, "response_format", "invalid_value"),
        (
            {"output_compression": 101},
            openai.BadRequestError,
            "output_compression",
            "invalid_value",
        ),
        ({"prompt": "   "}, openai.BadRequestError, "prompt", "invalid_value"),
        ({"model": "dall-e-3"}, openai.NotFoundError, "model", "model_not_found"),
        ({"model": "px-gated"}, openai.InternalServerError, "model", "model_not_activated"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]}" for k in v),
)
def test_errors_are_openai_exceptions_and_generate_nothing(
    live: str, kwargs: dict[str, Any], error: type[openai.APIStatusError], param: str, code: str
) -> None:
    request: dict[str, Any] = {"model": "pixels", "prompt": "x", "size": "16x16", **kwargs}
    with pytest.raises(error) as caught:
        openai_client(live).images.generate(**request)
    exc = caught.value
    assert exc.param == param and exc.code == code, exc.body
    assert exc.type == ("server_error" if exc.status_code >= 500 else "invalid_request_error")
    assert isinstance(exc.body, dict) and exc.body["message"]
    assert jobs_of(live) == []


def test_unknown_model_lists_the_valid_ones(live: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client(live).images.generate(model="nope", prompt="x")
    assert caught.value.status_code == 404
    assert "pixels/px-1 (also px-1, pixels-fast)" in caught.value.message


def test_models_list_is_openai_model_objects_with_our_fields(live: str) -> None:
    models = {m.id: m for m in openai_client(live).models.list()}
    assert {"pixels/px-1", "pixels/px-gated"} <= set(models)
    model = models["pixels/px-1"]
    assert model.object == "model" and model.owned_by == "pixels"
    assert isinstance(model.created, int) and model.created > 1_600_000_000
    extra = model.model_extra or {}
    assert extra["family"] == "pixels" and extra["aliases"] == ["pixels-fast"]
    assert extra["active"] is True and models["pixels/px-gated"].model_extra["active"] is False  # type: ignore[index]


def test_the_api_key_is_checked_and_a_401_has_the_envelope(
    make_settings: Callable[..., Settings], pixels: Pixels
) -> None:
    app = create_app(make_settings(plugins=[], api_key=KEY), extra_plugins=[("pixels", pixels)])
    with TestClient(app) as c:
        refused = c.post(IMAGES, json={"prompt": "x"}, headers={"authorization": "Bearer nope"})
        assert refused.status_code == 401
        body = refused.json()
        assert (
            body["error"]["code"] == "invalid_api_key" and "Authorization: Bearer" in body["detail"]
        )
        ok = c.post(IMAGES, json={"prompt": "x"}, headers={"authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200, ok.text


# -- the host's choices ----------------------------------------------------------------------
@pytest.mark.parametrize("model", [None, "pixels", "PIXELS", "px-1", "pixels-fast", "pixels/px-1"])
def test_a_model_is_named_by_id_name_alias_or_family(
    make_client: Callable[..., TestClient], model: str | None
) -> None:
    body = {"prompt": "x"} if model is None else {"prompt": "x", "model": model}
    response = make_client().post(IMAGES, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "pixels/px-1"


def test_the_plugin_gets_the_folded_request_and_unknown_fields(
    make_client: Callable[..., TestClient], pixels: Pixels
) -> None:
    response = make_client().post(
        IMAGES,
        json={
            "prompt": "x",
            "quality": "hd",
            "size": "auto",
            "user": "someone",
            "style": "vivid",
            "output_compression": 0,
            "seed": 5,
        },
    )
    assert response.status_code == 200, response.text
    request = pixels.requests[-1]
    assert request.quality == "high"  # DALL-E's hd
    assert (request.width, request.height) == (None, None)
    assert request.output_compression == 0 and request.seed == 5 and request.n == 1
    assert request.extra == {"style": "vivid"}  # `user` is known (and ignored)
    assert request.model.key == "pixels/px-1"


def test_defaults_are_b64_json_png_one_image(make_client: Callable[..., TestClient]) -> None:
    body = make_client().post(IMAGES, json={"prompt": "x"}).json()
    assert body["output_format"] == "png" and len(body["data"]) == 1
    assert set(body["data"][0]) == {"b64_json", "revised_prompt", "kiapi_job_id", "kiapi_file_id"}


@pytest.mark.parametrize(
    ("content", "headers", "status", "param"),
    [
        (b"{nope", {"content-type": "application/json"}, 400, None),
        (b"[1]", {"content-type": "application/json"}, 400, None),
        (b"{}", {"content-type": "application/json"}, 400, "prompt"),
        (b"prompt=x", {"content-type": "application/x-www-form-urlencoded"}, 415, None),
    ],
)
def test_a_bad_body_is_an_openai_error(
    make_client: Callable[..., TestClient],
    content: bytes,
    headers: dict[str, str],
    status: int,
    param: str | None,
) -> None:
    response = make_client().post(IMAGES, content=content, headers=headers)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


@pytest.mark.parametrize(
    ("header", "value"),
    [("X-Kiapi-Priority", "11"), ("Cancel-After", "soon"), ("Idempotency-Key", "k" * 300)],
)
def test_a_bad_submit_header_is_an_openai_400(
    make_client: Callable[..., TestClient], header: str, value: str
) -> None:
    # The route's documented refusals are OpenAI's 400s (schemathesis found a 422 here).
    body = {"prompt": "a red square", "model": "pixels"}
    response = make_client().post(IMAGES, json=body, headers={header: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == header


def test_a_failed_image_fails_the_request_and_cancels_the_others(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    response = client.post(IMAGES, json={"prompt": "x", "n": 3, "fail": [0], "delay_s": 0.2})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "generation_failed"
    assert "pixels was asked to fail" in error["message"]
    statuses = [client.get(f"/v1/jobs/{j}").json()["status"] for j in error["kiapi_job_ids"]]
    assert statuses[0] == "failed"
    # The others never make an image nobody can collect.
    for job_id in error["kiapi_job_ids"][1:]:
        deadline = time.monotonic() + 10
        while client.get(f"/v1/jobs/{job_id}").json()["status"] != "canceled":
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_timeout_is_a_504_and_cancels_the_jobs(make_client: Callable[..., TestClient]) -> None:
    client = make_client(sync_timeout_s=0.3)
    response = client.post(IMAGES, json={"prompt": "x", "n": 2, "delay_s": 5})
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "timeout" and "KIAPI_SYNC_TIMEOUT_S" in error["message"]
    for job_id in error["kiapi_job_ids"]:
        deadline = time.monotonic() + 10
        while client.get(f"/v1/jobs/{job_id}").json()["status"] != "canceled":
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_full_queue_is_a_429_and_leaves_no_job_behind(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_queue=1)
    response = client.post(IMAGES, json={"prompt": "x", "n": 4, "delay_s": 2})
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "queue_full"
    deadline = time.monotonic() + 10
    while any(j["status"] not in ("canceled",) for j in client.get("/v1/jobs").json()["jobs"]):
        assert time.monotonic() < deadline, client.get("/v1/jobs").json()
        time.sleep(0.05)


def test_without_an_image_plugin_every_model_is_404(client: TestClient) -> None:
    response = client.post(IMAGES, json={"prompt": "x"})
    assert response.status_code == 404
    assert "no installed plugin generates images" in response.json()["error"]["message"]


# -- the hook --------------------------------------------------------------------------------
class Squatter:
    """Registers a generator for a family it has no model of."""

    @hookimpl
    def register_job_handlers(self, register: Callable[[str, Any], None]) -> None:
        register("squat", lambda ctx: {})

    @hookimpl
    def register_image_generators(self, register: Callable[[ImageGenerator], None]) -> None:
        register(ImageGenerator(family="pixels", job_type="squat", prepare=lambda r: []))


class NoHandler(Pixels):
    @hookimpl
    def register_job_handlers(self, register: Callable[[str, Any], None]) -> None:
        pass


class Twin(Pixels):
    """A second plugin with the same family: refused as a collision."""

    FREE = ModelSpec(name="twin", family="pixels", domain="image", load=lambda w, o: None)

    @hookimpl
    def register_capabilities(self, register: Callable[[Capability], None]) -> None:
        pass

    @hookimpl
    def register_models(self, register: Callable[[ModelSpec], None]) -> None:
        register(self.FREE)

    @hookimpl
    def register_job_handlers(self, register: Callable[[str, Any], None]) -> None:
        register("twin", self.run)

    @hookimpl
    def register_image_generators(self, register: Callable[[ImageGenerator], None]) -> None:
        register(ImageGenerator(family="pixels", job_type="twin", prepare=self.prepare))


@pytest.mark.parametrize(
    ("plugins", "says"),
    [
        ([("squat", Squatter())], "this plugin registers no model of that family"),
        ([("nohandler", NoHandler())], "job type 'pixels' has no handler from this plugin"),
        (
            [("pixels", Pixels()), ("twin", Twin())],
            "image generator 'pixels' is already registered by plugin 'pixels'",
        ),
    ],
    ids=["foreign-family", "no-handler", "collision"],
)
def test_a_bad_generator_refuses_its_plugin(
    make_settings: Callable[..., Settings], plugins: list[tuple[str, object]], says: str
) -> None:
    with TestClient(create_app(make_settings(plugins=[]), extra_plugins=plugins)) as c:
        health = c.get("/health").json()
        assert health["status"] == "degraded"
        refused = next(p for p in health["plugins"] if p["status"] == "failed")
        assert any(says in e for e in refused["errors"]), refused["errors"]


def test_the_endpoint_is_documented_from_the_models(make_client: Callable[..., TestClient]) -> None:
    doc = make_client().get("/openapi.json").json()
    validate(doc, cls=OpenAPIV31SpecValidator)
    op = doc["paths"][IMAGES]["post"]
    assert set(op["responses"]) >= {"200", "400", "404", "429", "503", "504"}
    assert op["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIError"
    }
    request = doc["components"]["schemas"]["ImageGenerationRequest"]
    assert request["required"] == ["prompt"]
    assert request["properties"]["n"]["anyOf"][0]["maximum"] == 4
    assert {"created", "data", "kiapi_job_ids"} <= set(
        doc["components"]["schemas"]["ImagesResponse"]["properties"]
    )
    assert doc["components"]["schemas"]["ModelInfo"]["properties"]["created"]["type"] == "integer"


def test_capabilities_name_their_operations_and_models(client: TestClient) -> None:
    rows = {c["name"]: c for c in client.get("/v1/capabilities").json()["data"]}
    echo = rows["echo"]
    assert echo["domain"] == "text" and echo["plugin"] == "echo"
    assert echo["operations"] == {"run": "/v1/text/echo/run"}
    assert echo["openapi"] == "/v1/text/echo/openapi.json"
    assert echo["models"] == ["echo/echo-1"]


def test_an_image_request_gives_distinct_seeds_and_refuses_too_high_a_first_one() -> None:
    from kiapi_core import ImageParamError, ImageRequest, ModelSpec

    spec = ModelSpec(name="m", family="f", domain="image", load=lambda *_: None)
    request = ImageRequest("p", spec, 4, None, None, "auto", "png", None, seed=None)
    drawn = request.seeds()
    assert len(set(drawn)) == 4 and all(0 <= s < 2**32 for s in drawn)
    given = ImageRequest("p", spec, 3, None, None, "auto", "png", None, seed=2**64 - 3)
    assert given.seeds() == [2**64 - 3, 2**64 - 2, 2**64 - 1]
    over = ImageRequest("p", spec, 3, None, None, "auto", "png", None, seed=2**64 - 2)
    with pytest.raises(ImageParamError) as caught:
        over.seeds()
    assert caught.value.param == "seed" and "below 2**64" in caught.value.message
    assert ImageRequest("p", spec, 2, None, None, "auto", "png", None, seed=5).seeds(7) == [5, 6]
    with pytest.raises(ImageParamError, match="below 7 "):
        ImageRequest("p", spec, 3, None, None, "auto", "png", None, seed=5).seeds(7)
