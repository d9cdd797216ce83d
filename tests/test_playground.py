"""GET /playground: static files with no data, protected like every route, and the page itself
driven in headless Chromium against an echo server that has an API key."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from kiapi_core.app import create_app
from kiapi_core.playground import ASSETS
from kiapi_core.settings import Settings
from kiapi_core.testing import LiveServer, browser, start_server
from kiapi_core.testing.browser import fill, until

KEY = "playground-test-key-0123456789"


def basic(password: str, user: str = "anyone") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}"}


@pytest.fixture
def locked(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(api_key=KEY))) as c:
        yield c


def test_the_page_is_static_files_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert (
        "script-src 'self'" in csp and "connect-src 'self'" in csp and "img-src 'self' blob:" in csp
    )
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-cache"
    assert set(re.findall(r'(?:src|href)="(/[^"]+\.(?:js|css))"', page.text)) == {
        "/playground/playground.js",
        "/playground/playground.css",
    }
    for path, (_, media_type) in ASSETS.items():
        response = client.get(path)
        assert response.status_code == 200 and response.headers["content-type"] == media_type
        # No CDN, no third party: everything the page loads is ours.
        assert not re.search(r"https?://", response.text), path


def test_the_page_is_documented(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, (_, media_type) in ASSETS.items():
        content = paths[path]["get"]["responses"]["200"]["content"]
        assert list(content) == [media_type.split(";")[0]]


def test_with_a_key_the_page_needs_it_too(locked: TestClient) -> None:
    refused = locked.get("/playground", headers={"accept": "text/html"})
    assert refused.status_code == 401
    # The browser asks for the key itself when it sees a Basic challenge.
    challenges = refused.headers.get_list("www-authenticate")
    assert challenges == ['Bearer realm="kiapi"', 'Basic realm="kiapi", charset="UTF-8"']
    assert "the key as the password" in refused.json()["detail"]
    for path in ASSETS:
        assert locked.get(path, headers=basic(KEY)).status_code == 200
        assert locked.get(path, headers=basic(KEY, user="")).status_code == 200
        assert locked.get(path, headers={"authorization": f"Bearer {KEY}"}).status_code == 200
        assert locked.get(path, headers=basic("wrong")).status_code == 401
        assert locked.get(path, headers={"authorization": "Basic !!!"}).status_code == 401


def test_data_routes_never_take_basic(locked: TestClient) -> None:
    # Credentials a browser resends on its own must not reach data: that would be CSRF.
    for path in ("/v1/jobs", "/v1/capabilities", "/openapi.json"):
        response = locked.get(path, headers=basic(KEY))
        assert response.status_code == 401
        assert response.headers.get_list("www-authenticate") == ['Bearer realm="kiapi"']


# -- in a browser ----------------------------------------------------------------------------
needs_browser = pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing()))


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    home = tmp_path_factory.mktemp("playground")
    live = start_server(home, {"KIAPI_PLUGINS": "echo", "KIAPI_API_KEY": KEY})
    yield live
    live.stop()


@pytest.fixture
def chrome(tmp_path: Path) -> Iterator[Any]:
    driver = browser.headless_chrome(tmp_path / "profile")
    yield driver
    driver.quit()


def text(driver: Any, element_id: str) -> str:
    return str(driver.find_element("id", element_id).text)


@needs_browser
def test_the_page_works_with_a_key_through_fetch_streaming(
    keyed_server: LiveServer, chrome: Any
) -> None:
    from selenium.webdriver.common.keys import Keys

    host = keyed_server.url.removeprefix("http://")
    # The page's own files: the browser answers the Basic challenge (here from the URL).
    chrome.get(f"http://user:{KEY}@{host}/playground")
    assert chrome.title == "kiapi playground"
    # Its data calls carry the bearer token from the key field, so it asks for one first.
    until(chrome, lambda d: "needs its API key" in text(d, "error"))
    fill(chrome, "api-key", KEY + Keys.TAB)
    until(chrome, lambda d: d.find_elements("css selector", "#capability option"))
    assert chrome.find_element("id", "capability").get_attribute("value") == "echo"
    # The form comes from echo's OpenAPI: its text field is the prompt, the rest are options.
    fields = {
        e.get_attribute("data-field") for e in chrome.find_elements("css selector", "[data-field]")
    }
    doc = httpx.get(
        f"{keyed_server.url}/openapi.json", headers={"authorization": f"Bearer {KEY}"}
    ).json()
    body = doc["paths"]["/v1/text/echo/run"]["post"]["requestBody"]["content"]
    ref = body["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    echo_request = doc["components"]["schemas"][ref]["properties"]
    assert fields == set(echo_request) - {"text", "mode"} and "steps" in fields
    assert chrome.find_element("id", "caption").get_attribute("hidden")  # echo has no /validate

    fill(chrome, "prompt", "hello from the browser")
    fill(chrome, "field-steps", "25")
    fill(chrome, "field-delay_s", "0.06")
    chrome.find_element("id", "submit").click()
    seen: set[str] = set()

    def finished(d: Any) -> bool:
        seen.add(str(d.execute_script("return document.getElementById('progress').value")))
        return bool(d.find_element("id", "job-status").get_attribute("data-status") == "succeeded")

    until(chrome, finished)
    assert len(seen - {"0", "1"}) >= 3, seen  # the bar moved through the steps
    until(chrome, lambda d: text(d, "result-text") == "hello from the browser")
    assert "steps\n25" in text(chrome, "result-params")
    until(chrome, lambda d: "hello from the browser" in text(d, "jobs"))

    # Cancel a long one while it runs.
    fill(chrome, "field-steps", "500")
    chrome.find_element("id", "submit").click()
    until(
        chrome,
        lambda d: (
            "step 3/500" in text(d, "progress-text") or "step 4/500" in text(d, "progress-text")
        ),
    )
    chrome.find_element("id", "cancel").click()
    until(
        chrome,
        lambda d: d.find_element("id", "job-status").get_attribute("data-status") == "canceled",
    )
    assert not chrome.find_element("id", "submit").get_attribute("disabled")

    # The key is remembered in this browser.
    chrome.refresh()
    until(chrome, lambda d: d.find_elements("css selector", "#capability option"))
    assert chrome.find_element("id", "api-key").get_attribute("value") == KEY


def open_with_key(chrome: Any, server: LiveServer) -> None:
    from selenium.webdriver.common.keys import Keys

    chrome.get(f"http://user:{KEY}@{server.url.removeprefix('http://')}/playground")
    fill(chrome, "api-key", KEY + Keys.TAB)
    until(chrome, lambda d: d.find_elements("css selector", "#capability option"))


def attr(driver: Any, element_id: str, name: str) -> str | None:
    value = driver.find_element("id", element_id).get_attribute(name)
    return None if value is None else str(value)


@needs_browser
def test_the_form_is_built_from_the_schema_and_checked_before_sending(
    keyed_server: LiveServer, chrome: Any
) -> None:
    open_with_key(chrome, keyed_server)
    until(chrome, lambda d: d.find_elements("id", "field-steps"))
    # Defaults, bounds and descriptions come from echo's request schema.
    assert attr(chrome, "field-steps", "value") == "3"
    assert (attr(chrome, "field-steps", "min"), attr(chrome, "field-steps", "max")) == ("1", "1000")
    assert attr(chrome, "field-delay_s", "step") == "any"
    assert attr(chrome, "field-fail", "type") == "checkbox"
    misbehave = chrome.find_elements("css selector", "#field-misbehave option")
    assert [o.get_attribute("value") for o in misbehave] == [
        "",
        "nan_result",
        "nan_progress",
        "nan_detail",
    ]
    assert "Progress steps to report." in text(chrome, "fields")
    assert "Text to echo back." in text(chrome, "prompt-hint")
    assert chrome.find_element("id", "layout").get_attribute("hidden")  # no canvas for echo

    jobs = keyed_server.client(headers={"authorization": f"Bearer {KEY}"})
    before = jobs.get("/v1/jobs").json()["jobs"]
    fill(chrome, "prompt", "bounded")
    fill(chrome, "field-steps", "5000")
    until(chrome, lambda d: "at most 1000" in text(d, "field-steps-error"))
    fill(chrome, "priority", "11")
    chrome.find_element("id", "submit").click()
    until(chrome, lambda d: "need fixing" in text(d, "error"))
    assert "from -10 to 10" in text(chrome, "priority-error")
    assert jobs.get("/v1/jobs").json()["jobs"] == before  # nothing was sent
    fill(chrome, "field-steps", "2")
    until(chrome, lambda d: not d.find_elements("id", "field-steps-error"))


@needs_browser
def test_server_422s_show_on_their_field_and_headers_are_sent(
    keyed_server: LiveServer, chrome: Any
) -> None:
    open_with_key(chrome, keyed_server)
    fill(chrome, "prompt", "with headers")
    # Cancel-After is checked by the server only: its 422 names the header, shown on the input.
    fill(chrome, "cancel-after", "soon")
    chrome.find_element("id", "submit").click()
    until(chrome, lambda d: d.find_elements("id", "cancel-after-error"))
    assert "30s" in text(chrome, "cancel-after-error")
    assert attr(chrome, "cancel-after", "aria-invalid") == "true"
    assert not chrome.find_element("id", "submit").get_attribute("disabled")

    fill(chrome, "cancel-after", "5m")
    fill(chrome, "priority", "7")
    chrome.find_element("id", "submit").click()
    until(chrome, lambda d: attr(d, "job-status", "data-status") == "succeeded")
    assert not chrome.find_elements("id", "cancel-after-error")
    job_id = text(chrome, "job-status").split(":")[0]
    job = keyed_server.client(headers={"authorization": f"Bearer {KEY}"}).get(f"/v1/jobs/{job_id}")
    assert job.json()["priority"] == 7 and job.json()["deadline"] is not None


@needs_browser
def test_the_eta_shows_beside_the_progress(keyed_server: LiveServer, chrome: Any) -> None:
    open_with_key(chrome, keyed_server)
    fill(chrome, "prompt", "timed")
    fill(chrome, "field-steps", "60")
    fill(chrome, "field-delay_s", "0.1")
    chrome.find_element("id", "submit").click()
    until(chrome, lambda d: re.search(r"ETA \d+", text(d, "eta")))
    until(chrome, lambda d: attr(d, "job-status", "data-status") == "succeeded")
    assert text(chrome, "eta") == ""
