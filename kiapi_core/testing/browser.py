"""Headless Chromium for testing the playground (ours, or a plugin's capability in it).

Needs ``selenium`` (a dev dependency) and a Chromium with its driver: Debian's ``chromium`` and
``chromium-driver`` packages (CI installs them), or set KIAPI_CHROMIUM / KIAPI_CHROMEDRIVER.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def _binaries() -> tuple[str | None, str | None]:
    browser = (
        os.environ.get("KIAPI_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    driver = os.environ.get("KIAPI_CHROMEDRIVER") or shutil.which("chromedriver")
    return browser, driver


def missing() -> str | None:
    """Why no browser can be started here (a reason to skip), or None."""
    browser, driver = _binaries()
    if browser is None or driver is None:
        return (
            "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    return None


def headless_chrome(profile: Path, width: int = 1400, height: int = 1500) -> Any:
    """A fresh headless Chromium (its own profile directory), driven by selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = _binaries()
    if browser is None or driver is None:
        raise RuntimeError(missing())
    options = Options()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(driver), options=options)


def until(driver: Any, predicate: Callable[[Any], Any], timeout: float = 30) -> Any:
    """Poll ``predicate(driver)`` until truthy; its value (selenium's TimeoutException after)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page re-renders lists while a test looks: a vanished element means "look again".
    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException]
    )
    return wait.until(predicate)


def fill(driver: Any, element_id: str, value: str) -> None:
    """Replace the value of the input with this id, as typing would."""
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)
