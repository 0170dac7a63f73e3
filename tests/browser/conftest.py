"""What every browser test shares: Debian's Chromium (``playwright install`` cannot
download browsers here) driven by Playwright's sync API, a fresh context per test, and the
folder the screenshots go to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connections

from tests.factories import PASSWORD

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


def watched_page(context):
    """A new page of ``context``; ``page.js_errors`` collects the page's uncaught errors."""
    page = context.new_page()
    page.js_errors = []
    page.on("pageerror", lambda error: page.js_errors.append(str(error)))
    return page


@pytest.fixture
def page(browser_context):
    """One page of that context, its uncaught errors in ``page.js_errors``."""
    return watched_page(browser_context)


def log_in(page, live_server, username: str, password: str = PASSWORD) -> None:
    """Sign in through the login form and wait until the header says so."""
    from playwright.sync_api import expect

    page.goto(f"{live_server.url}/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_text("Signed in as")).to_contain_text(username)


def log_out(page) -> None:
    page.get_by_role("button", name="Log out").click()


# What every page is checked for (tests/browser/test_tour_browser.py runs it on each page,
# the journey on the pages it passes through): a list of problems in words, empty when
# none. One <h1>, headings without skipped levels, landmarks, a skip link to the main
# content, a name for every form control and image, and text contrast of at least WCAG AA
# (4.5:1, or 3:1 for large text) against the colours actually painted under it.
AUDIT = "\n".join(
    line
    for line in (Path(__file__).parent / "audit.js").read_text().splitlines()
    if not line.startswith("//")
)

# Keyboard: the first Tab lands on the skip link, which shows on screen with a focus ring
# of 3:1 or more against what is painted around it.
FIRST_TAB = r"""() => {
  const el = document.activeElement;
  if (!el || !el.classList.contains("skip-link")) {
    return `the first Tab focuses ${el ? el.outerHTML.slice(0, 80) : "nothing"}`;
  }
  const box = el.getBoundingClientRect();
  if (box.left < 4 || box.top < 4 || box.right > innerWidth || box.width < 2) {
    return "the focused skip link is off screen";
  }
  const style = getComputedStyle(el);
  if (style.outlineStyle === "none" || parseFloat(style.outlineWidth) < 2) {
    return "the focused skip link shows no focus ring";
  }
  const rgb = (value) => (value.match(/[\d.]+/g) || []).map(Number);
  const luminance = (c) => {
    const [r, g, b] = c.slice(0, 3).map((v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const offset = parseFloat(style.outlineOffset) + parseFloat(style.outlineWidth) + 2;
  let around = document.elementsFromPoint(box.left - offset, box.top + box.height / 2)
    .find((node) => node !== el);
  let under = [255, 255, 255];
  for (; around; around = around.parentElement) {
    const colour = rgb(getComputedStyle(around).backgroundColor);
    if (colour.length === 3 || colour[3] === 1) { under = colour; break; }
  }
  const [hi, lo] = [luminance(rgb(style.outlineColor)), luminance(under)].sort((a, b) => b - a);
  const ratio = (hi + 0.05) / (lo + 0.05);
  return ratio < 3 ? `the focus ring has a contrast of ${ratio.toFixed(2)}:1` : "";
}"""

# The first Tab is checked on a page where nothing has the focus yet. A page that puts it
# in its form at once (autofocus) sends the first Tab on through the form, and after a
# click the Tab goes on from what was clicked: the skip link is for pages that start at
# the top.
UNFOCUSED = "!document.activeElement || document.activeElement === document.body"
AUTOFOCUSED = "document.activeElement.matches('main [autofocus]')"


def audit(page, *, fresh: bool = True) -> list[str]:
    """The page's problems (see AUDIT), its uncaught errors and, on a page just opened
    (``fresh``: Chrome tabs on from the last element clicked, even once it lost the focus),
    the keyboard's first stop."""
    problems = list(page.evaluate(AUDIT))
    if fresh and page.evaluate(UNFOCUSED):
        page.keyboard.press("Tab")
        if tab := page.evaluate(FIRST_TAB):
            problems.append(tab)
    problems += [f"JavaScript error: {error}" for error in page.js_errors]
    return problems


def sideways_scroll(page) -> int:
    """How many pixels the page is wider than its window (0 when it fits)."""
    return page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
