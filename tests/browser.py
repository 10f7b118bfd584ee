"""Headless Chromium through Selenium for the page tests (tests/test_ui.py): skipped where it is missing, except
in CI (CI=true, where .ci/run installs it), where it must run."""

from __future__ import annotations

import os
import shutil
import time

import pytest


def browser(what: str, size: str = "1200,900"):
    why = None
    try:
        from selenium import webdriver
    except ImportError:
        why = "selenium is not installed (pip install 'alignpipe[test]')"
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if why is None and not (chromium and chromedriver):
        why = "chromium / chromedriver are not installed (apt-get install chromium chromium-driver)"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} cannot run in CI: {why}")
        pytest.skip(why)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={size}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def wait(predicate, what: str, timeout: float = 120.0, every: float = 0.2):
    """`predicate()`'s first true value, polled; fails naming `what` after `timeout` seconds."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - an element not there yet, or replaced while read
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
