"""The leaderboard in a real browser: Debian's Chromium driven by Playwright against
pytest-django's live server, over the stored boards and results that
tests/routing/test_leaderboard.py writes.

A visitor (no login) opens the leaderboard from the navigation, sees the history chart
drawn by the vendored uPlot, reads the tables, filters by task with the form, and the page
fits a phone's width. Screenshots at desktop and phone widths go under var/screenshots/.
"""

from __future__ import annotations

import pytest

from tests.browser.conftest import BROWSER_MARKS, PHONE, SCREENSHOTS
from tests.routing.test_leaderboard import tasks, world  # noqa: F401 (fixtures used by name)

playwright_sync = pytest.importorskip("playwright.sync_api")


pytestmark = BROWSER_MARKS

# How many pixels of the chart's canvas something was drawn on (alpha above zero).
PAINTED = """(canvas) => {
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 0) painted++;
  return painted;
}"""


def test_a_visitor_reads_the_leaderboard_and_its_chart(page, live_server, world):  # noqa: F811
    expect = playwright_sync.expect
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    page.goto(f"{live_server.url}/")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Leaderboard").click()
    expect(page.get_by_role("heading", name="Leaderboard", level=1)).to_be_visible()
    expect(page.get_by_role("link", name="Leaderboard")).to_have_attribute("aria-current", "page")

    # The chart is drawn: one canvas per split, each with paint on it.
    canvases = page.locator(".lb-chart canvas")
    expect(canvases).to_have_count(3)
    for i in range(3):
        canvas = canvases.nth(i)
        box = canvas.bounding_box()
        assert box is not None and box["width"] > 200 and box["height"] > 100
        assert canvas.evaluate(PAINTED) > 500
    legend = page.locator(".lb-chart").first.locator(".u-legend")
    expect(legend).to_contain_text("Mixture (routed)")
    expect(legend).to_contain_text("Oracle routing")

    # The tables read: the headline, a task's ranking, the contributors.
    hidden = page.locator("#split-hidden")
    expect(hidden.get_by_role("heading", name="Hidden examples")).to_be_visible()
    expect(hidden.get_by_role("definition").nth(2)).to_have_text("1.000")
    units = page.get_by_role("table", name="Unit conversion (Skills)")
    expect(units.get_by_role("row").nth(1)).to_contain_text("ann/units v1")
    expect(units.get_by_role("row").nth(1)).to_contain_text("+0.650 to +0.750")
    contributors = page.get_by_role("table", name="Admitted adapters, the mixture score")
    expect(contributors).to_contain_text("not measured")
    expect(contributors).to_contain_text("70.0%")
    history = page.get_by_role("table", name="Scores by mixture version (hidden examples)")
    expect(history.get_by_role("row")).to_have_count(3)
    page.screenshot(path=str(SCREENSHOTS / "leaderboard-chart-desktop.png"), full_page=True)

    # Filtering is a plain GET form.
    page.get_by_label("Task", exact=True).select_option("dates")
    page.get_by_role("button", name="Apply").click()
    expect(page).to_have_url(f"{live_server.url}/leaderboard/?task=dates&language=&license=")
    expect(page.get_by_text("Narrowed to")).to_be_visible()
    expect(page.get_by_role("table", name="Date formatting (Skills)")).to_be_visible()
    expect(page.get_by_role("table", name="Unit conversion (Skills)")).to_have_count(0)

    # On a phone: nothing wider than the screen but what scrolls inside a table's frame,
    # and the chart redrawn to fit.
    page.goto(f"{live_server.url}/leaderboard/")
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(400)  # the chart resizes 150 ms after the last resize event
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    box = page.locator(".lb-chart canvas").first.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    assert page.locator(".lb-chart canvas").first.evaluate(PAINTED) > 500
    page.screenshot(path=str(SCREENSHOTS / "leaderboard-chart-phone.png"), full_page=True)
    assert page.js_errors == []


def test_without_a_board_the_page_explains_and_draws_nothing(page, live_server, db):
    page.goto(f"{live_server.url}/leaderboard/")
    expect = playwright_sync.expect
    expect(page.get_by_text("No adapter has been admitted yet")).to_be_visible()
    expect(page.locator("canvas")).to_have_count(0)
    assert page.js_errors == []
