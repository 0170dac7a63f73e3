"""The playground in a real browser: Debian's Chromium driven by Playwright against
pytest-django's live server (WSGI, as gunicorn serves the portal), relaying to a real
inference server (tests/routing/conftest) on the tiny model with tiny adapters.

A contributor signs in, types a prompt, and sees the answer stream into the page with the
adapters that answered and the routing scores. The page is saved at desktop and phone widths
under var/screenshots/ for people to look at.
"""

from __future__ import annotations

import pytest

from contributions.models import ApiToken
from routing.playground import keys
from tests.browser.conftest import BROWSER_MARKS, SCREENSHOTS
from tests.factories import PASSWORD
from tests.routing.conftest import (  # noqa: F401 (the live inference server's fixtures)
    DATES_PROMPTS,
    UNITS_PROMPTS,
    admitted_version,
    api_redis_db,
    model_cache,
    no_evaluation,
    server,
    start_server,
    tiny_base_model,
    tiny_model_source,
)
from tests.routing.test_inference_api import wait_until

playwright_sync = pytest.importorskip("playwright.sync_api")


pytestmark = [
    *BROWSER_MARKS,
    pytest.mark.django_db(transaction=True),
]


def test_a_contributor_asks_the_mixture_and_watches_the_answer_and_its_attribution(
    browser_context,
    live_server,
    server,  # noqa: F811
    settings,
    contributor,
):
    expect = playwright_sync.expect
    settings.TESSERA_INFERENCE_URL = f"{server.url}/v1"
    admitted_version(contributor, slug="unit-conversion", prompts=UNITS_PROMPTS, seed=1)
    admitted_version(contributor, slug="date-formatting", prompts=DATES_PROMPTS, seed=2)
    wait_until(lambda: len(server.runtime.catalog) == 2)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser_context.new_page()

    # Signed out, the page explains itself and asks to sign in; the link comes back here.
    page.goto(f"{live_server.url}/")
    page.get_by_role("link", name="Playground").click()
    expect(page.get_by_role("heading", name="Sign in to try it")).to_be_visible()
    page.get_by_role("main").get_by_role("link", name="Log in").click()
    page.get_by_label("Username").fill(contributor.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Playground", exact=True)).to_be_visible()
    expect(page.get_by_role("link", name="Playground")).to_have_attribute("aria-current", "page")

    # The select is filled from the served models.
    model = page.get_by_label("Model")
    expect(model.locator("option[value='owner/unit-conversion']")).to_have_count(1)
    expect(model.locator("option[value='base']")).to_have_count(1)

    # Ask with the keyboard (Ctrl+Enter); the answer streams in, the attribution follows.
    page.get_by_label("Prompt").fill("Convert 7 km to metres.")
    page.get_by_label("Max tokens").fill("12")
    page.get_by_label("Prompt").press("Control+Enter")
    answer = page.locator("#playground-answer")
    expect(page.get_by_role("status").filter(has_text="Done")).to_be_visible()
    expect(answer).to_have_attribute("aria-busy", "false")
    assert answer.inner_text().strip()
    attribution = page.locator("#playground-attribution")
    expect(attribution.get_by_role("table", name="Adapters that answered")).to_contain_text(
        "owner/unit-conversion"
    )
    expect(attribution.get_by_role("table", name="Routing scores")).to_be_visible()
    expect(attribution).to_contain_text("embedding")
    page.screenshot(path=str(SCREENSHOTS / "playground-answer-desktop.png"), full_page=True)

    # No key anywhere in the page the browser holds.
    key = browser_context.pages[0].evaluate("document.documentElement.outerHTML")
    assert "tsr_" not in key
    assert ApiToken.objects.filter(user=contributor, name=keys.KEY_LABEL).count() == 1

    # A refusal is said in words on the page: one adapter by name cannot be mixed.
    page.get_by_label("Model").select_option("owner/date-formatting")
    page.get_by_label("Composition").select_option("topk")
    page.get_by_role("button", name="Ask").click()
    expect(page.get_by_role("alert")).to_contain_text("The inference API refused the request")

    # On a phone: one column, every control reachable; the whole answer again.
    page.set_viewport_size({"width": 390, "height": 844})
    page.get_by_label("Model").select_option("tessera")
    page.get_by_label("Composition").select_option("")
    page.get_by_label("Prompt").fill("How many grams are in 3 kg?")
    page.get_by_role("button", name="Ask").click()
    expect(page.get_by_role("status").filter(has_text="Done")).to_be_visible()
    expect(page.get_by_role("alert")).to_be_empty()
    expect(attribution.get_by_role("table", name="Routing scores")).to_be_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways on a phone ({width}px)"
    page.screenshot(path=str(SCREENSHOTS / "playground-answer-phone.png"), full_page=True)
