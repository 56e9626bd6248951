"""Debian's headless Chromium through Selenium for the tests that look at a page (no browser is
downloaded; where Chromium, its driver or Selenium is missing the test skips and says why)."""

from __future__ import annotations

import os
import shutil

import pytest


def start_chromium(window: str = "1100,800", phone_width: int | None = None):
    """A headless Chromium driver; `phone_width` emulates a phone of that many CSS pixels, which lays a
    page out as a phone does (its viewport tag, its zoom). The caller quits it."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.common.exceptions import WebDriverException

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download a browser
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={window}"):
        options.add_argument(flag)
    if phone_width:
        metrics = {"width": phone_width, "height": 800, "pixelRatio": 1}
        options.add_experimental_option("mobileEmulation", {"deviceMetrics": metrics})
    try:
        chrome = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    except WebDriverException as error:
        pytest.skip(f"Chromium did not start: {(str(error).strip().splitlines() or ['?'])[0]}")
    chrome.set_script_timeout(10)
    return chrome
