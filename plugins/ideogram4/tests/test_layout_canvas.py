"""The playground's layout canvas in headless Chromium, against a real server with ideogram4 and
no weights (the canvas needs only the OpenAPI document and POST /validate): boxes drawn with the
mouse land in the caption as exact bboxes, the JSON moves the boxes back, the keyboard moves and
deletes, colors come out as uppercase #RRGGBB, mflux's warnings land on their element, and the
server's 422 on the field it names."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from i4cli import OFFLINE

from kiapi_core.testing import LiveServer, browser, start_server
from kiapi_core.testing.browser import fill, until

pytestmark = pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing()))


@pytest.fixture(scope="module")
def light(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(
        tmp_path_factory.mktemp("canvas"), {**OFFLINE, "KIAPI_PLUGINS": "ideogram4"}
    )
    yield live
    live.stop()


@pytest.fixture
def page(light: LiveServer, tmp_path: Path) -> Iterator[Any]:
    driver = browser.headless_chrome(tmp_path / "profile")
    driver.get(f"{light.url}/playground")
    until(driver, lambda d: d.find_element("id", "layout").get_attribute("hidden") is None)
    yield driver
    driver.quit()


def stage_rect(driver: Any) -> dict[str, float]:
    return dict(
        driver.execute_script("return document.getElementById('stage').getBoundingClientRect()")
    )


def units(pixels: float, origin: float, size: float) -> int:
    """The canvas's rounding (JS Math.round, halves up) of a pointer position to 0..1000."""
    return min(max(math.floor((pixels - origin) / size * 1000 + 0.5), 0), 1000)


def drag(driver: Any, start: tuple[int, int], end: tuple[int, int]) -> None:
    """Press at start, move in two steps, release at end (viewport pixels)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    actions = ActionBuilder(driver)
    pointer = actions.pointer_action
    pointer.move_to_location(*start)
    pointer.pointer_down()
    pointer.move_to_location((start[0] + end[0]) // 2, (start[1] + end[1]) // 2)
    pointer.move_to_location(*end)
    pointer.pointer_up()
    actions.perform()


def caption(driver: Any) -> dict[str, Any]:
    return dict(json.loads(driver.find_element("id", "prompt").get_attribute("value")))


def elements(driver: Any) -> list[dict[str, Any]]:
    return list(caption(driver)["compositional_deconstruction"]["elements"])


def set_prompt(driver: Any, value: str) -> None:
    driver.execute_script(
        "const p = document.getElementById('prompt'); p.value = arguments[0];"
        " p.dispatchEvent(new Event('input'));",
        value,
    )


def box_units(driver: Any, index: int) -> list[int]:
    """Where box `index` is drawn, back in caption units: [y_min, x_min, y_max, x_max]."""
    return list(
        driver.execute_script(
            "const s = document.getElementById('stage').getBoundingClientRect();"
            " const b = document.querySelectorAll('#boxes .box')[arguments[0]]"
            ".getBoundingClientRect();"
            " const u = (v, o, n) => Math.round((v - o) / n * 1000);"
            " return [u(b.top, s.top, s.height), u(b.left, s.left, s.width),"
            " u(b.bottom, s.top, s.height), u(b.right, s.left, s.width)];",
            index,
        )
    )


def test_a_mouse_drag_draws_an_element_with_the_exact_bbox(page: Any) -> None:
    fill(page, "prompt", "a poster that says OPEN")
    r = stage_rect(page)
    start = (int(r["left"] + 0.2 * r["width"]), int(r["top"] + 0.1 * r["height"]))
    end = (int(r["left"] + 0.7 * r["width"]), int(r["top"] + 0.35 * r["height"]))
    # Dragged up and to the left: the bbox is still [y_min, x_min, y_max, x_max].
    drag(page, end, start)
    until(page, lambda d: d.find_elements("css selector", "#boxes .box"))
    expected = [
        units(start[1], r["top"], r["height"]),
        units(start[0], r["left"], r["width"]),
        units(end[1], r["top"], r["height"]),
        units(end[0], r["left"], r["width"]),
    ]
    assert all(abs(a - b) <= 3 for a, b in zip(expected, [100, 200, 350, 700], strict=True))
    got = caption(page)
    # The plain prompt became the caption's description; keys in the verifier's order.
    assert list(got) == ["high_level_description", "compositional_deconstruction"]
    assert got["high_level_description"] == "a poster that says OPEN"
    assert list(got["compositional_deconstruction"]) == ["background", "elements"]
    (element,) = elements(page)
    assert element["bbox"] == expected
    assert list(element) == ["type", "bbox", "text", "desc"] and element["type"] == "text"

    # A second one, as an object, drawn down-right; then a handle resizes the first.
    page.find_element("css selector", 'input[name="draw-type"][value="obj"]').click()
    drag(page, (int(r["left"] + 0.5 * r["width"]), int(r["top"] + 0.6 * r["height"])),
         (int(r["left"] + 0.9 * r["width"]), int(r["top"] + 0.9 * r["height"])))  # fmt: skip
    until(page, lambda d: len(elements(d)) == 2)
    assert list(elements(page)[1]) == ["type", "bbox", "desc"]
    page.find_elements("css selector", "#boxes .box")[0].click()
    handle = page.find_element("css selector", "#boxes .box.selected .handle.se")
    spot = page.execute_script(
        "const b = arguments[0].getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2]",
        handle,
    )
    target = (int(r["left"] + 0.8 * r["width"]), int(r["top"] + 0.5 * r["height"]))
    drag(page, (int(spot[0]), int(spot[1])), target)
    until(
        page,
        lambda d: elements(d)[0]["bbox"]
        == [expected[0], expected[1], units(target[1], r["top"], r["height"]),
            units(target[0], r["left"], r["width"])],
    )  # fmt: skip


def test_editing_the_json_moves_the_boxes(page: Any) -> None:
    layout = {
        "high_level_description": "two labels",
        "compositional_deconstruction": {
            "background": "white",
            "elements": [
                {"type": "text", "bbox": [100, 100, 200, 500], "text": "A", "desc": "big"},
                {"type": "obj", "bbox": [600, 300, 900, 700], "desc": "a box"},
            ],
        },
    }
    set_prompt(page, json.dumps(layout))
    until(page, lambda d: len(d.find_elements("css selector", "#boxes .box")) == 2)
    assert abs(box_units(page, 1)[0] - 600) <= 2 and abs(box_units(page, 1)[3] - 700) <= 2
    layout["compositional_deconstruction"]["elements"][1]["bbox"] = [50, 550, 250, 950]  # type: ignore[index]
    set_prompt(page, json.dumps(layout, indent=1))
    until(
        page,
        lambda d: all(
            abs(a - b) <= 2 for a, b in zip(box_units(d, 1), [50, 550, 250, 950], strict=True)
        ),
    )
    # Typing over the JSON never rewrites it; a half-typed JSON leaves the boxes where they are.
    set_prompt(page, '{"high_level_description": "tw')
    assert (
        page.find_element("id", "prompt").get_attribute("value") == '{"high_level_description": "tw'
    )
    assert len(page.find_elements("css selector", "#boxes .box")) == 2

    # The aspect ratio follows width and height.
    fill(page, "field-width", "1024")
    fill(page, "field-height", "512")
    until(page, lambda d: abs(stage_rect(d)["width"] / stage_rect(d)["height"] - 2) < 0.02)


def test_keyboard_moves_resizes_and_deletes(page: Any) -> None:
    from selenium.webdriver.common.keys import Keys

    set_prompt(page, json.dumps({
        "high_level_description": "keys",
        "compositional_deconstruction": {"background": "", "elements": [
            {"type": "obj", "bbox": [100, 100, 300, 300], "desc": "first"},
            {"type": "text", "bbox": [500, 500, 600, 900], "text": "B", "desc": "second"},
        ]},
    }))  # fmt: skip
    until(page, lambda d: len(d.find_elements("css selector", "#boxes .box")) == 2)
    # Tab from the last tool button reaches the first box.
    page.find_element("id", "show-boxes").send_keys(Keys.TAB)
    assert page.switch_to.active_element.get_attribute("data-index") == "0"
    active = page.switch_to.active_element
    active.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_DOWN)
    until(page, lambda d: elements(d)[0]["bbox"] == [110, 120, 310, 320])
    active.send_keys(Keys.SHIFT, Keys.ARROW_LEFT)  # Shift: one unit
    until(page, lambda d: elements(d)[0]["bbox"] == [110, 119, 310, 319])
    active.send_keys(Keys.ALT, Keys.ARROW_RIGHT)  # Alt: resize from the bottom-right corner
    until(page, lambda d: elements(d)[0]["bbox"] == [110, 119, 310, 329])
    for _ in range(20):  # never past the edge
        active.send_keys(Keys.ARROW_UP)
    until(page, lambda d: elements(d)[0]["bbox"] == [0, 119, 200, 329])
    # The editor follows the focused box; Tab moves to the next one, Delete removes it.
    assert page.find_element("id", "el-desc").get_attribute("value") == "first"
    active.send_keys(Keys.TAB)
    second = page.switch_to.active_element
    assert second.get_attribute("data-index") == "1"
    until(page, lambda d: d.find_element("id", "el-text").get_attribute("value") == "B")
    second.send_keys(Keys.DELETE)
    until(page, lambda d: [e["desc"] for e in elements(d)] == ["first"])
    assert len(page.find_elements("css selector", "#boxes .box")) == 1


def test_the_editor_writes_text_desc_and_uppercase_colors(page: Any) -> None:
    page.find_element("id", "add-obj").click()
    until(page, lambda d: d.find_element("id", "element-editor").get_attribute("hidden") is None)
    from selenium.webdriver.support.ui import Select

    Select(page.find_element("id", "el-type")).select_by_value("text")
    fill(page, "el-text", "SALE")
    fill(page, "el-desc", "red condensed letters")
    page.find_element("id", "el-add-color").click()
    # The native picker cannot be driven; what it does on a pick is set the value, fire input.
    page.execute_script(
        "const c = document.querySelector('#el-colors input[type=color]');"
        " c.value = '#a1b2c3'; c.dispatchEvent(new Event('input', {bubbles: true}));"
    )
    until(page, lambda d: elements(d)[0].get("color_palette") == ["#A1B2C3"])
    (element,) = elements(page)
    assert list(element) == ["type", "bbox", "text", "desc", "color_palette"]
    assert element["text"] == "SALE" and element["desc"] == "red condensed letters"
    until(
        page, lambda d: "no warnings (JSON caption)" in d.find_element("id", "caption-status").text
    )
    page.find_element("id", "el-delete").click()
    until(page, lambda d: elements(d) == [])


def test_warnings_land_on_their_element(page: Any) -> None:
    set_prompt(page, json.dumps({
        "high_level_description": "warned",
        "compositional_deconstruction": {"background": "", "elements": [
            {"type": "obj", "bbox": [100, 100, 300, 300], "desc": "fine"},
            {"type": "obj", "desc": "bbox after desc", "bbox": [500, 500, 600, 900],
             "color_palette": ["red"]},
        ]},
    }))  # fmt: skip
    until(page, lambda d: d.find_elements("css selector", "#boxes .box.warn"))
    boxes = page.find_elements("css selector", "#boxes .box")
    assert [b.get_attribute("data-warnings") for b in boxes] == ["0", "2"]
    assert "elements[1]: key order" in boxes[1].get_attribute("title")
    boxes[1].click()
    until(page, lambda d: "uppercase #RRGGBB" in d.find_element("id", "el-warnings").text)
    # Moving the box rewrites the element in the verifier's key order: that warning goes.
    page.switch_to.active_element.send_keys("\ue014")  # ARROW_RIGHT
    until(page, lambda d: d.find_elements("css selector", '#boxes .box[data-warnings="1"]'))
    assert list(elements(page)[1]) == ["type", "bbox", "desc", "color_palette"]


def test_a_422_is_shown_on_the_field_it_names(page: Any, light: LiveServer) -> None:
    fill(page, "prompt", "a sign")
    fill(page, "field-width", "300")  # within the schema, refused by the server (multiple of 16)
    page.find_element("id", "submit").click()
    until(page, lambda d: d.find_elements("id", "field-width-error"))
    assert "multiple of 16" in page.find_element("id", "field-width-error").text
    assert page.find_element("id", "field-width").get_attribute("aria-invalid") == "true"
    # Bounds the schema states are checked before anything is sent.
    fill(page, "field-quality", "101")
    until(page, lambda d: "at most 100" in d.find_element("id", "field-quality-error").text)
    before = httpx.get(f"{light.url}/v1/jobs").json()["jobs"]
    page.find_element("id", "submit").click()
    until(page, lambda d: "need fixing" in d.find_element("id", "error").text)
    assert httpx.get(f"{light.url}/v1/jobs").json()["jobs"] == before


def luminance(css: str) -> float:
    """WCAG relative luminance of an rgb()/rgba() color."""
    channels = [float(v) / 255 for v in re.findall(r"[\d.]+", css)[:3]]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_readable_in_both_schemes_and_at_a_phone_width(
    light: LiveServer, tmp_path: Path, scheme: str
) -> None:
    driver = browser.headless_chrome(tmp_path / "profile")
    try:
        driver.execute_cdp_cmd(
            "Emulation.setEmulatedMedia",
            {"features": [{"name": "prefers-color-scheme", "value": scheme}]},
        )
        for width in (1280, 390):
            driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 500},
            )
            driver.get(f"{light.url}/playground")
            until(driver, lambda d: d.find_element("id", "layout").get_attribute("hidden") is None)
            driver.find_element("id", "add-text").click()
            until(driver, lambda d: d.find_elements("css selector", "#boxes .box"))
            # Nothing sticks out sideways: no horizontal scrolling, the canvas fits.
            assert driver.execute_script("return document.documentElement.scrollWidth") <= width
            assert stage_rect(driver)["right"] <= width
            for selector in ("#form", "#output", "#element-editor", "#warnings"):
                ink, ground = driver.execute_script(
                    "const e = document.querySelector(arguments[0]);"
                    " const panel = document.querySelector('.panel');"
                    " return [getComputedStyle(e).color,"
                    " getComputedStyle(panel).backgroundColor];",
                    selector,
                )
                hi, lo = sorted((luminance(ink), luminance(ground)), reverse=True)
                assert (hi + 0.05) / (lo + 0.05) >= 4.5, (scheme, width, selector, ink, ground)
            dark_ground = luminance(
                driver.execute_script(
                    "return getComputedStyle(document.querySelector('.panel')).backgroundColor"
                )
            )
            assert (dark_ground < 0.1) == (scheme == "dark")
    finally:
        driver.quit()
