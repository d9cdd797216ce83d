"""The Models, Jobs and Files pages (/playground/models, /jobs, /files): static files under the
playground's policy and auth, driven in headless Chromium against a real server with an API
key, the echo plugin and the ideogram4 plugin without weights."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from kiapi_core.app import create_app
from kiapi_core.playground import ASSETS, PAGES
from kiapi_core.settings import Settings
from kiapi_core.testing import LiveServer, browser, start_server
from kiapi_core.testing.browser import fill, until

KEY = "pages-test-key-0123456789abcdef"
ECHO = "/v1/text/echo/run"
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6360f8cf00000301010018dd8db00000000049454e44ae426082"
)


def test_each_page_is_its_html_its_script_and_the_shared_files(client: TestClient) -> None:
    for page in PAGES:
        response = client.get(f"/playground/{page}")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
        loads = set(re.findall(r'(?:src|href)="(/[^"]+\.(?:js|css))"', response.text))
        assert loads == {"/playground/common.css", f"/playground/{page}.js"}
        # Every page links every other one, the playground included.
        links = set(re.findall(r'<a href="(/playground[^"]*)"', response.text))
        assert links == {"/playground", *(f"/playground/{p}" for p in PAGES)}
        script = client.get(f"/playground/{page}.js").text
        assert 'from "/playground/common.js"' in script
        # Its own <main> in the shared header, whole: one document, nothing left unfilled.
        assert f"<title>kiapi {page}</title>" in response.text and "$" not in response.text
        assert response.text.count("<main>") == 1 and response.text.rstrip().endswith("</html>")
        # Revalidated (no-cache) as the static files are: unchanged, a 304 without a body.
        again = client.get(
            f"/playground/{page}", headers={"If-None-Match": response.headers["etag"]}
        )
        assert again.status_code == 304 and again.content == b""
    assert {"/playground/common.js", "/playground/common.css"} <= set(ASSETS)


def test_models_name_the_command_that_activates_them(
    make_settings: Callable[..., Settings],
) -> None:
    with TestClient(create_app(make_settings(plugins=["echo", "ideogram4"]))) as c:
        rows = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert rows["ideogram4/fp8"]["active"] is False
    assert rows["ideogram4/fp8"]["activate_command"] == "kiapi activate ideogram4"
    assert rows["echo/echo-1"]["active"] is True and rows["echo/echo-1"]["activate_command"] is None


# -- in a browser ----------------------------------------------------------------------------
needs_browser = pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing()))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # ideogram4 without weights: its catalog is there, its model is not activated.
    home = tmp_path_factory.mktemp("pages")
    live = start_server(home, {"KIAPI_PLUGINS": "echo,ideogram4", "KIAPI_API_KEY": KEY})
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url, headers={"authorization": f"Bearer {KEY}"}, timeout=30
    ) as c:
        yield c


@pytest.fixture
def chrome(tmp_path: Path) -> Iterator[Any]:
    driver = browser.headless_chrome(tmp_path / "profile", width=1280, height=1000)
    yield driver
    driver.quit()


def open_page(driver: Any, server: LiveServer, page: str, key: str | None = KEY) -> None:
    """The page as a person opens it: Basic credentials for the file, then the key typed."""
    from selenium.webdriver.common.keys import Keys

    host = server.url.removeprefix("http://")
    driver.get(f"http://user:{KEY}@{host}/playground/{page}")
    if key is not None:
        fill(driver, "api-key", key + Keys.TAB)


def css(driver: Any, selector: str) -> list[Any]:
    return list(driver.find_elements("css selector", selector))


def row(driver: Any, job_id: str) -> Any:
    return driver.find_element("css selector", f'tr[data-job="{job_id}"]')


def row_status(driver: Any, job_id: str) -> str:
    found = css(driver, f'tr[data-job="{job_id}"]')
    return str(found[0].get_attribute("data-status")) if found else ""


def in_row(driver: Any, job_id: str, selector: str, *keys: str) -> None:
    """Click (or type into) an element of a job's row, looking again if the row was redrawn."""

    def act(d: Any) -> bool:
        element = row(d, job_id).find_element("css selector", selector)
        if keys:
            element.clear()
            element.send_keys(*keys)
        else:
            element.click()
        return True

    until(driver, act)


def submit(http: httpx.Client, **fields: Any) -> str:
    response = http.post(ECHO, json={"mode": "async", **fields})
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def wait_job(http: httpx.Client, job_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == status:
            return job
        time.sleep(0.05)
    raise AssertionError(f"{job_id} is {job['status']}, not {status}")


@needs_browser
def test_pages_refuse_without_the_key(server: LiveServer, chrome: Any) -> None:
    assert httpx.get(f"{server.url}/playground/jobs").status_code == 401
    for page in PAGES:
        open_page(chrome, server, page, key=None)
        chrome.execute_script("localStorage.removeItem('kiapi.playground.key')")
        chrome.refresh()
        until(chrome, lambda d: "needs its API key" in d.find_element("id", "error").text)
        assert not css(chrome, "tbody tr")


@needs_browser
def test_models_page_shows_the_activate_command(
    server: LiveServer, http: httpx.Client, chrome: Any
) -> None:
    open_page(chrome, server, "models")
    until(chrome, lambda d: css(d, 'tr[data-model="ideogram4/fp8"] code.activate'))
    ideogram = chrome.find_element("css selector", 'tr[data-model="ideogram4/fp8"]')
    assert ideogram.find_element("css selector", "code.activate").text == "kiapi activate ideogram4"
    assert "not activated" in ideogram.text and "not loaded" in ideogram.text
    echo = chrome.find_element("css selector", 'tr[data-model="echo/echo-1"]')
    assert "active" in echo.text and not echo.find_elements("css selector", "code.activate")
    ideogram.find_element("css selector", "button.copy").click()
    until(chrome, lambda d: "cop" in ideogram.find_element("css selector", ".command").text)
    # Warm / Unload appear exactly when the server documents their endpoints.
    paths = http.get("/openapi.json").json()["paths"]
    warm = any(p.startswith("/v1/models/{") and p.endswith("}/load") for p in paths)
    assert warm and css(chrome, "button.warm")
    assert "running" in chrome.find_element("id", "server").text

    # Unload the echo model from its row, then warm it again: the row follows each change.
    def echo_row() -> Any:
        return chrome.find_element("css selector", 'tr[data-model="echo/echo-1"]')

    http.post("/v1/text/echo/run", json={"text": "load it", "steps": 1})
    until(chrome, lambda d: "resident" in echo_row().text.split("not loaded")[0], timeout=30)
    until(chrome, lambda d: echo_row().find_element("css selector", "button.unload").is_enabled())
    echo_row().find_element("css selector", "button.unload").click()
    until(chrome, lambda d: "not loaded" in echo_row().text, timeout=30)
    assert not any(m["resident"] for m in http.get("/v1/models").json()["data"])
    until(chrome, lambda d: echo_row().find_element("css selector", "button.warm").is_enabled())
    echo_row().find_element("css selector", "button.warm").click()
    until(chrome, lambda d: "not loaded" not in echo_row().text, timeout=60)
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models["echo/echo-1"]["resident"]


@needs_browser
def test_jobs_page_cancels_retries_and_reprioritizes(
    server: LiveServer, http: httpx.Client, chrome: Any
) -> None:
    from selenium.webdriver.common.keys import Keys

    open_page(chrome, server, "jobs")
    until(chrome, lambda d: d.find_element("id", "live").text in ("live", "polling"))
    # A slow job appears by itself (no reload) and runs.
    slow = submit(http, text="slow one", steps=600, delay_s=0.05)
    until(chrome, lambda d: row_status(d, slow) == "running")
    until(chrome, lambda d: "step" in row(d, slow).find_element("css selector", ".label").text)
    # Behind it (one slot), a queued job whose priority the page changes.
    queued = submit(http, text="waiting", steps=1)
    until(chrome, lambda d: css(d, f'tr[data-job="{queued}"] input.priority-value'))
    fill_priority = row(chrome, queued).find_element("css selector", "input.priority-value")
    fill_priority.clear()
    fill_priority.send_keys("5" + Keys.ENTER)  # the keyboard submits the row's form
    until(chrome, lambda d: http.get(f"/v1/jobs/{queued}").json()["priority"] == 5)
    until(chrome, lambda d: "priority 5" in row(d, queued).text)
    # An out-of-range priority is refused with the rule.
    fill_priority = row(chrome, queued).find_element("css selector", "input.priority-value")
    fill_priority.clear()
    fill_priority.send_keys("11" + Keys.ENTER)
    until(chrome, lambda d: "-10 to 10" in d.find_element("id", "error").text)

    # Cancel the running one from its row.
    row(chrome, slow).find_element("css selector", "button.cancel").click()
    until(chrome, lambda d: row_status(d, slow) == "canceled")
    assert wait_job(http, slow, "canceled")["artifacts"] == []
    wait_job(http, queued, "succeeded")

    # A failed job, retried with the keyboard: a new job linked both ways.
    failing = submit(http, text="boom", fail=True)
    until(chrome, lambda d: row_status(d, failing) == "failed")
    retry = row(chrome, failing).find_element("css selector", "button.retry")
    retry.send_keys(Keys.ENTER)
    until(chrome, lambda d: "retried as job_" in row(d, failing).text)
    original = http.get(f"/v1/jobs/{failing}").json()
    again = original["retried_by"]
    assert again and http.get(f"/v1/jobs/{again}").json()["retry_of"] == failing
    until(chrome, lambda d: f"retry of {failing}" in row(d, again).text)
    assert not row(chrome, failing).find_elements("css selector", "button.retry")

    # The status filter asks the server for that status only.
    from selenium.webdriver.support.ui import Select

    Select(chrome.find_element("id", "filter-status")).select_by_value("canceled")
    until(
        chrome,
        lambda d: not css(d, f'tr[data-job="{queued}"]') and css(d, f'tr[data-job="{slow}"]'),
    )
    assert {r.get_attribute("data-status") for r in css(chrome, "tbody tr")} == {"canceled"}


@needs_browser
def test_files_page_lists_pages_downloads_and_deletes(
    server: LiveServer, http: httpx.Client, chrome: Any, tmp_path: Path
) -> None:
    ids = []
    for i in range(27):  # more than one page of 25
        up = http.post(
            "/v1/files", files={"file": (f"note-{i}.txt", f"note {i}".encode(), "text/plain")}
        )
        assert up.status_code in (200, 201), up.text
        ids.append(up.json()["id"])
    image = http.post("/v1/files", files={"file": ("dot.png", PNG, "image/png")}).json()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    open_page(chrome, server, "files")
    chrome.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    until(chrome, lambda d: len(css(d, "tbody tr")) == 25)
    newest = chrome.find_element("css selector", "tbody tr")
    assert newest.get_attribute("data-file") == image["id"]
    assert "image/png" in newest.text and f"{len(PNG)} B" in newest.text
    until(
        chrome, lambda d: newest.find_elements("css selector", ".thumb img")
    )  # fetched with the key

    chrome.find_element("id", "more").click()
    until(chrome, lambda d: len(css(d, "tbody tr")) >= 28)
    assert not chrome.find_element("id", "more").is_displayed() or len(css(chrome, "tbody tr")) > 28

    # Download: the bytes land under the file's name.
    newest.find_element("css selector", "button.download").click()
    until(
        chrome,
        lambda d: (downloads / "dot.png").exists() and (downloads / "dot.png").read_bytes() == PNG,
    )

    # Delete asks once more in the row; "Keep" keeps it.
    target = ids[-1]
    line = chrome.find_element("css selector", f'tr[data-file="{target}"]')
    line.find_element("css selector", "button.delete").click()
    line.find_element("css selector", "button.keep").click()
    assert http.get(f"/v1/files/{target}").status_code == 200
    line.find_element("css selector", "button.delete").click()
    line.find_element("css selector", "button.confirm-delete").click()
    until(chrome, lambda d: not css(d, f'tr[data-file="{target}"]'))
    assert http.get(f"/v1/files/{target}").status_code == 404


@needs_browser
@pytest.mark.parametrize("page", PAGES)
def test_pages_fit_a_phone_and_follow_dark_mode(
    server: LiveServer, http: httpx.Client, chrome: Any, page: str
) -> None:
    submit(http, text="for the list", steps=1)
    chrome.set_window_size(390, 844)
    chrome.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    open_page(chrome, server, page)
    until(chrome, lambda d: css(d, "tbody tr"))
    # Nothing wider than the phone: no sideways scrolling.
    width = chrome.execute_script("return document.documentElement.scrollWidth - innerWidth")
    assert width <= 0, f"{page} is {width}px wider than the phone"
    background = chrome.execute_script(
        "return getComputedStyle(document.documentElement).backgroundColor"
    )
    red, green, blue = (int(v) for v in re.findall(r"\d+", background)[:3])
    assert red + green + blue < 120, background  # dark
    ink = chrome.execute_script("return getComputedStyle(document.body).color")
    assert sum(int(v) for v in re.findall(r"\d+", ink)[:3]) > 500, ink  # light text on it
