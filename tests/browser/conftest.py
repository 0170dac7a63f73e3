"""What every browser test shares: Debian's Chromium (``playwright install`` cannot
download browsers here) driven by Playwright's sync API, a fresh context per test, and the
folder the screenshots go to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connections

# Playwright's sync API runs an event loop in this thread; Django's ORM (used by the
# fixtures) refuses to run where a loop is running unless told it is safe.
os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
SCREENSHOTS = Path(settings.BASE_DIR) / "var" / "screenshots"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}

# Every browser test module's marks.
BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed"),
]


@pytest.fixture
def browser_context():
    """A desktop-sized context of a freshly launched Chromium (launch() gives every browser
    a temporary profile of its own)."""
    playwright_sync = pytest.importorskip("playwright.sync_api")
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        context = browser.new_context(viewport=DESKTOP)
        context.set_default_timeout(30_000)
        try:
            yield context
        finally:
            context.close()
            browser.close()
            # Inside sync_playwright() this code runs in Playwright's greenlet, which has
            # its own contextvars, so Django opened a second connection for the ORM calls
            # made here; close it, or the test database cannot be dropped at the end.
            connections.close_all()


@pytest.fixture
def page(browser_context):
    """One page of that context; ``page.js_errors`` collects the page's uncaught errors."""
    page = browser_context.new_page()
    page.js_errors = []
    page.on("pageerror", lambda error: page.js_errors.append(str(error)))
    return page
