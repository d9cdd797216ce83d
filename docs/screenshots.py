"""Regenerate the screenshots of the pages in docs/: the playground's layout canvas, Models,
Jobs and Files.

    uv run python docs/screenshots.py

Starts a real server (the echo test plugin, installed into this venv as the tests do, and the
ideogram4 plugin without weights), gives it some jobs and files, and saves each page from
headless Chromium at 1280 px (light), plus the Jobs page at a phone width in dark mode, as
palette PNGs. docs/playground.png (a real generated image under the canvas) comes from the
ideogram4 browser test, which needs the tiny checkpoint; docs/canvas.png here is the layout
canvas with a three-element caption.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from kiapi_core.testing import browser, start_server

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
ECHO = "/v1/text/echo/run"
CAPTION = {
    "high_level_description": "A concert poster for a jazz night",
    "style_description": {"art_style": "bold mid-century print", "color_palette": ["#1B2A49"]},
    "compositional_deconstruction": {
        "background": "deep navy paper with a warm grain",
        "elements": [
            {
                "type": "text",
                "bbox": [80, 120, 260, 880],
                "text": "JAZZ NIGHT",
                "desc": "tall condensed letters",
                "color_palette": ["#F2B134"],
            },
            {"type": "obj", "bbox": [300, 250, 760, 750], "desc": "a saxophone, gold"},
            {
                "type": "text",
                "bbox": [800, 200, 900, 800],
                "text": "FRIDAY 9 PM",
                "desc": "small caps",
                "color_palette": ["#F4F1E8"],
            },
        ],
    },
}


def poster(hue: int) -> bytes:
    """A small gradient PNG, so the Files page has image thumbnails to show."""
    image = Image.new("HSV", (96, 96))
    image.putdata([((hue + x) % 256, 160 + y // 2, 230) for y in range(96) for x in range(96)])
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    return out.getvalue()


def populate(c: httpx.Client) -> None:
    def job(**fields: Any) -> str:
        return str(c.post(ECHO, json={"mode": "async", **fields}).json()["job_id"])

    for text in ("a red poster that says HELLO", "menu board, three columns", "logo: kiapi"):
        job(text=text, steps=3)
    failed = job(text="this one fails", fail=True)
    canceled = job(text="canceled while running", steps=400, delay_s=0.05)
    time.sleep(1.0)
    c.delete(f"/v1/jobs/{canceled}")
    time.sleep(0.5)
    c.post(f"/v1/jobs/{failed}/retry", headers={"X-Kiapi-Priority": "3"})
    job(text="a long running one", steps=1000, delay_s=0.05)
    job(text="waiting for a slot", steps=3)
    for hue, name in ((0, "sunrise.png"), (90, "forest.png"), (170, "ocean.png")):
        c.post("/v1/files", files={"file": (name, poster(hue), "image/png")})
    c.post("/v1/files", files={"file": ("notes.txt", b"caption drafts\n", "text/plain")})
    time.sleep(2.0)  # the long job makes some progress


def shoot(driver: Any, url: str, path: Path, ready: str, *, load: bool = True) -> None:
    if load:
        driver.get(url)
    browser.until(driver, lambda d: d.find_elements("css selector", ready))
    time.sleep(1.5)  # thumbnails and the live list settle
    png = driver.get_screenshot_as_png()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")


def shoot_canvas(driver: Any, base: str) -> None:
    driver.get(base)
    browser.until(driver, lambda d: d.find_elements("css selector", "#capability option"))
    driver.execute_script(
        "const s = document.getElementById('capability'); s.value = 'ideogram4';"
        " s.dispatchEvent(new Event('change'));"
    )
    browser.until(driver, lambda d: d.find_element("id", "layout").get_attribute("hidden") is None)
    driver.execute_script(
        "const p = document.getElementById('prompt'); p.value = arguments[0];"
        " p.dispatchEvent(new Event('input'));",
        json.dumps(CAPTION, indent=2),
    )
    shoot(driver, base, DOCS / "canvas.png", "#stage .box", load=False)


def main() -> None:
    if reason := browser.missing():
        sys.exit(reason)
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import install_plugin  # the echo test plugin, pip-installed as the tests do

    install_plugin("echo")
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp) / "home", {"KIAPI_PLUGINS": "echo,ideogram4"})
        driver = browser.headless_chrome(Path(tmp) / "profile", width=1280, height=860)
        try:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                populate(c)
            base = f"{server.url}/playground"
            shoot_canvas(driver, base)
            shoot(driver, f"{base}/models", DOCS / "models.png", "code.activate")
            shoot(driver, f"{base}/jobs", DOCS / "jobs.png", "tbody tr")
            shoot(driver, f"{base}/files", DOCS / "files.png", ".thumb img")
            driver.set_window_size(390, 844)
            driver.execute_cdp_cmd(
                "Emulation.setEmulatedMedia",
                {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
            )
            shoot(driver, f"{base}/jobs", DOCS / "jobs-phone-dark.png", "tbody tr")
        finally:
            driver.quit()
            server.stop()


if __name__ == "__main__":
    main()
