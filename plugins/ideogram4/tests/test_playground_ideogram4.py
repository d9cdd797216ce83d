"""The playground in headless Chromium against the warm ideogram4 server: live caption warnings,
one real 256x256 V4_TURBO_12 image with a moving progress bar, a 512x512 V4_QUALITY_48 run
canceled while denoising, recent jobs with thumbnails. The screenshot goes to docs/ too."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_generate import CAPTION  # the caption mflux accepts without a warning

from kiapi_core.testing import LiveServer, browser
from kiapi_core.testing.browser import fill, until

DOCS_SCREENSHOT = Path(__file__).resolve().parents[3] / "docs" / "playground.png"

pytestmark = pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing()))


@pytest.fixture
def chrome(tmp_path: Path) -> Iterator[Any]:
    driver = browser.headless_chrome(tmp_path / "profile", height=1400)
    yield driver
    driver.quit()


def by_id(driver: Any, element_id: str) -> Any:
    return driver.find_element("id", element_id)


def options(driver: Any, preset: str, size: int) -> None:
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, "field-preset")).select_by_value(preset)
    fill(driver, "field-width", str(size))
    fill(driver, "field-height", str(size))


def status(driver: Any) -> str:
    return str(by_id(driver, "job-status").get_attribute("data-status") or "")


def test_generate_watch_cancel_and_browse(server: LiveServer, chrome: Any, tmp_path: Path) -> None:
    chrome.get(f"{server.url}/playground")
    until(chrome, lambda d: d.find_elements("css selector", "#capability option"))
    assert by_id(chrome, "capability").get_attribute("value") == "ideogram4"

    # Live caption warnings from POST /v1/image/ideogram4/validate, while typing.
    fill(chrome, "prompt", "a red poster that says HELLO")
    until(chrome, lambda d: "plain prompt" in by_id(d, "warnings").text)
    assert "1 warning" in by_id(chrome, "caption-status").text
    chrome.execute_script(
        "const p = document.getElementById('prompt'); p.value = arguments[0];"
        " p.dispatchEvent(new Event('input'));",
        json.dumps(CAPTION, indent=2),
    )
    until(chrome, lambda d: "no warnings (JSON caption)" in by_id(d, "caption-status").text)

    # One real image, the bar moving through the phases.
    options(chrome, "V4_TURBO_12", 256)
    fill(chrome, "field-seed", "11")
    by_id(chrome, "submit").click()
    seen: list[float] = []

    def done(d: Any) -> bool:
        value = float(d.execute_script("return document.getElementById('progress').value"))
        if not seen or seen[-1] != value:
            seen.append(value)
        return status(d) == "succeeded"

    until(chrome, done, timeout=240)
    assert seen == sorted(seen) and len(seen) >= 5, seen
    until(chrome, lambda d: d.execute_script(
        "return document.getElementById('result-image').naturalWidth") == 256)  # fmt: skip
    params = by_id(chrome, "result-params").text
    assert "V4_TURBO_12" in params and "seed\n11" in params and "high_level_description" in params
    job_id = by_id(chrome, "job-status").text.split(":")[0]
    job = httpx.get(f"{server.url}/v1/jobs/{job_id}").json()
    assert job["params"]["prompt"] == CAPTION and job["status"] == "succeeded"

    # A long one, canceled while it denoises (before the expensive decode).
    options(chrome, "V4_QUALITY_48", 512)
    by_id(chrome, "submit").click()
    until(chrome, lambda d: "denoising" in by_id(d, "progress-text").text)
    by_id(chrome, "cancel").click()
    until(chrome, lambda d: status(d) == "canceled")
    canceled_id = by_id(chrome, "job-status").text.split(":")[0]
    canceled = httpx.get(f"{server.url}/v1/jobs/{canceled_id}").json()
    assert canceled["status"] == "canceled" and canceled["artifacts"] == []

    # Recent jobs, with thumbnails fetched with the page's credentials; a click shows one.
    until(chrome, lambda d: d.find_elements("css selector", f'#jobs li[data-job="{job_id}"] img'))
    card = f'#jobs li[data-job="{canceled_id}"]'
    until(chrome, lambda d: "canceled" in d.find_element("css selector", card).text)
    until(
        chrome,
        lambda d: d.find_element("css selector", f'#jobs li[data-job="{job_id}"]').click() or True,
    )
    until(chrome, lambda d: status(d) == "succeeded")
    until(chrome, lambda d: d.execute_script(
        "return document.getElementById('result-image').naturalWidth") == 256)  # fmt: skip
    chrome.execute_script("window.scrollTo(0, 0)")

    shot = tmp_path / "playground.png"
    assert chrome.save_screenshot(str(shot))
    shutil.copyfile(shot, DOCS_SCREENSHOT)


def test_live_previews_appear_under_the_boxes_before_the_result(
    server: LiveServer, chrome: Any
) -> None:
    chrome.get(f"{server.url}/playground")
    until(chrome, lambda d: by_id(d, "layout").get_attribute("hidden") is None)
    chrome.execute_script(
        "const p = document.getElementById('prompt'); p.value = arguments[0];"
        " p.dispatchEvent(new Event('input'));",
        json.dumps(CAPTION, indent=2),
    )
    until(chrome, lambda d: len(d.find_elements("css selector", "#boxes .box")) == 2)
    options(chrome, "V4_TURBO_12", 256)
    fill(chrome, "field-seed", "5")
    by_id(chrome, "submit").click()
    # What lies under the boxes, in order: nothing, previews, then the result.
    seen: list[str] = []

    def done(d: Any) -> bool:
        kind = str(by_id(d, "stage").get_attribute("data-image") or "")
        if kind and (not seen or seen[-1] != kind):
            seen.append(kind)
        return status(d) == "succeeded" and "result" in seen

    until(chrome, done, timeout=240)
    assert seen[0] == "preview" and seen[-1] == "result", seen
    assert int(by_id(chrome, "output").get_attribute("data-previews-before-result")) >= 1
    until(chrome, lambda d: d.execute_script(
        "return document.getElementById('stage-image').naturalWidth") == 256)  # fmt: skip
    assert by_id(chrome, "boxes").is_displayed()  # the boxes stay over the image
