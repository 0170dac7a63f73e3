"""The public model card and contributor profile in a real browser: Debian's Chromium
driven by Playwright against pytest-django's live server, over the stored world that
tests/routing/test_leaderboard.py writes.

A visitor (no login) goes from the leaderboard to an adapter's model card (its README
rendered, without the script it carried), then to its contributor's profile, and both
pages fit a phone's width. Screenshots at desktop and phone widths go under var/screenshots/.
"""

from __future__ import annotations

from tests.browser import test_leaderboard_browser as browser
from tests.browser.conftest import BROWSER_MARKS, DESKTOP, PHONE, SCREENSHOTS
from tests.routing import test_leaderboard as leaderboard_data
from tests.routing.test_public_pages import README, with_readme

playwright_sync = browser.playwright_sync
pytestmark = BROWSER_MARKS

# Fixtures used by name: the leaderboard tests' stored world.
tasks = leaderboard_data.tasks
world = leaderboard_data.world


def _fits_a_phone(page, name: str) -> None:
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(200)
    # Nothing wider than the screen but what scrolls inside a table's frame.
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.screenshot(path=str(SCREENSHOTS / f"{name}-phone.png"), full_page=True)
    page.set_viewport_size(DESKTOP)


def test_a_visitor_goes_from_the_leaderboard_to_a_card_and_its_contributor(
    page, live_server, world
):
    expect = playwright_sync.expect
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with_readme(world["units"], README)
    alerts: list[str] = []
    page.on("dialog", lambda dialog: (alerts.append(dialog.message), dialog.dismiss()))

    page.goto(f"{live_server.url}/leaderboard/")
    units = page.get_by_role("table", name="Unit conversion (Skills)")
    units.get_by_role("link", name="ann/units").click()

    # The model card: facts, the README rendered, scores, versions and traffic.
    expect(page).to_have_url(f"{live_server.url}/models/ann/units/")
    expect(page.get_by_role("heading", name="Units", level=1)).to_be_visible()
    expect(page.get_by_role("heading", name="Units, converted", level=3)).to_be_visible()
    docs = page.get_by_role("link", name="the docs")
    expect(docs).to_have_attribute("rel", "nofollow noopener noreferrer")
    expect(page.locator(".pub-card-body img, .pub-card-body script")).to_have_count(0)
    scores = page.get_by_role("table", name="Score on each target task")
    expect(scores.get_by_role("row").nth(1)).to_contain_text("+0.650 to +0.750")
    expect(page.get_by_role("table", name="Answers per day")).to_contain_text("60")
    bars = page.locator(".pub-bars span")
    expect(bars).to_have_count(30)
    assert bars.last.bounding_box()["height"] > 50  # today's 60 answers: the tallest bar
    expect(page.get_by_role("link", name="Back to the leaderboard")).to_be_visible()
    page.screenshot(path=str(SCREENSHOTS / "visitor-model-card-desktop.png"), full_page=True)
    _fits_a_phone(page, "visitor-model-card")

    # The contributor's profile, from the card.
    page.get_by_role("definition").get_by_role("link", name="Ann").click()
    expect(page).to_have_url(f"{live_server.url}/contributors/ann/")
    expect(page.get_by_role("heading", name="Ann", level=1)).to_be_visible()
    expect(page.get_by_role("link", name="Units", exact=True)).to_be_visible()
    credit = page.get_by_role("table", name="The mixture score each adapter added")
    expect(credit).to_contain_text("+0.250")
    expect(page.get_by_text("70.0%")).to_be_visible()
    page.screenshot(path=str(SCREENSHOTS / "visitor-contributor-desktop.png"), full_page=True)
    _fits_a_phone(page, "visitor-contributor")

    assert alerts == []  # the README's script never ran
    assert page.js_errors == []
