"""A screenshot tour of every page, in a real browser: Debian's Chromium driven by Playwright
against pytest-django's live server, over one stored world (the leaderboard tests' admitted
adapters and scoreboards, plus a contributor's adapter in review, rejected and evaluating).

Each page of TOUR is opened as the visitor it is meant for, at desktop and at phone width,
saved as var/screenshots/<page>-desktop.png and <page>-phone.png, and checked: the status
it should answer with, one <h1> and headings in order, landmarks and a working skip link,
a label for every form control, alt text, text contrast of WCAG AA, no uncaught JavaScript
error, nothing that fails to load, and no sideways scrolling on a phone. Every problem of
every page is listed in one failure. A page broken on purpose shows the checks can fail.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta

import pytest

from contributions.models import AdapterVersion
from contributions.services import api_token_create
from evaluation import models as em
from evaluation.services import review as review_services
from evaluation.services.test_sets import contributor_test_set_create
from tests.browser.conftest import (
    AUTOFOCUSED,
    BROWSER_MARKS,
    DESKTOP,
    PHONE,
    SCREENSHOTS,
    UNFOCUSED,
    audit,
    log_in,
    sideways_scroll,
    watched_page,
)
from tests.browser.test_review_browser import CARD
from tests.evaluation.test_review import make_run, make_version
from tests.factories import AdapterFactory, UserFactory
from tests.routing import test_leaderboard as leaderboard_data
from tests.routing.test_public_pages import README, with_readme

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect

pytestmark = BROWSER_MARKS

# Fixtures used by name: the leaderboard tests' stored world.
tasks = leaderboard_data.tasks
world = leaderboard_data.world

VISITOR, OWNER, NEWCOMER, MAINTAINER = "", "owner", "newbie", "maint"


@dataclass(frozen=True)
class Stop:
    """One page of the tour: its screenshots' name, its path (filled from the tour world's
    ids), who looks at it (signed in as that user, or signed out) and the status it answers."""

    name: str
    path: str
    who: str = VISITOR
    status: int = 200


# Every page of the site a person sees (the url confs of contributions, evaluation and
# routing; the API, its docs and Django's admin are not pages of this site's design).
TOUR = (
    Stop("home", "/"),
    Stop("signup", "/signup/"),
    Stop("login", "/login/"),
    Stop("rules", "/rules/"),
    Stop("policy", "/policy/"),
    Stop("leaderboard", "/leaderboard/"),
    Stop("model-card", "/models/ann/units/"),
    Stop("contributor", "/contributors/ann/"),
    Stop("playground-signed-out", "/playground/"),
    Stop("not-found", "/no-such-page/", status=404),
    Stop("dashboard-empty", "/adapters/", NEWCOMER),
    Stop("dashboard", "/adapters/", OWNER),
    Stop("adapter-new", "/adapters/new/", OWNER),
    Stop("adapter-edit", "/adapters/{adapter}/edit/", OWNER),
    Stop("adapter-detail", "/adapters/{adapter}/", OWNER),
    Stop("upload", "/adapters/{adapter}/upload/", OWNER),
    Stop("test-sets", "/adapters/{adapter}/test-sets/", OWNER),
    Stop("appeal", "/adapters/{adapter}/versions/1/appeal/", OWNER),
    Stop("tokens", "/tokens/", OWNER),
    Stop("playground", "/playground/", OWNER),
    Stop("forbidden", "/review/", OWNER, status=403),
    Stop("review-queue", "/review/", MAINTAINER),
    Stop("review-detail", "/review/{in_review}/", MAINTAINER),
    Stop("dashboard-maintainer", "/adapters/", MAINTAINER),
)

SUMS = (
    b'{"prompt": "What is 120 + 7?", "target": "127"}\n'
    b'{"prompt": "Add 5 and 999.", "target": "1004"}\n'
)


@pytest.fixture
def tour_world(world, contributor, maintainer, settings):
    """The leaderboard's world, plus the contributor's adapter with a rejected v1 (it may be
    appealed), a v2 waiting for review with a model card and a v3 being evaluated; a test
    set, an API token, and a newcomer with nothing yet."""
    # Nothing answers here: the signed-in playground offers the mixture alone.
    settings.TESSERA_INFERENCE_URL = "http://127.0.0.1:9/v1"
    with_readme(world["units"], README)
    UserFactory(username=NEWCOMER)
    # Both worlds number their made-up weights' hashes from 1; give the leaderboard's others.
    for version in AdapterVersion.objects.all():
        digest = hashlib.sha256(f"leaderboard {version.pk}".encode()).hexdigest()
        AdapterVersion.objects.filter(pk=version.pk).update(weights_sha256=digest)
    adder = AdapterFactory(owner=contributor, slug="adder", title="Three-digit adder")
    v1 = make_version(adder, number=1, changed_ago=timedelta(days=2))
    make_run(v1, adapter_score=0.31)
    review_services.review_reject(
        version=v1, actor=maintainer, reason="The gain on addition is too small to admit."
    )
    in_review = make_version(adder, number=2, card=CARD, changed_ago=timedelta(hours=3))
    make_run(in_review)
    running = make_version(adder, number=3, status="evaluating")
    make_run(running, status=em.EvaluationRun.Status.RUNNING, progress=(3, 10))
    contributor_test_set_create(
        adapter=adder, actor=contributor, name="My sums", metric="exact_match", jsonl=SUMS
    )
    api_token_create(user=contributor, name="laptop CLI")
    return {"adapter": adder.pk, "in_review": in_review.pk}


def test_every_page_at_desktop_and_phone_width(browser_context, live_server, tour_world):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser = browser_context.browser
    pages = {}
    failed: dict[str, list[str]] = {}
    for who in dict.fromkeys(stop.who for stop in TOUR):
        pages[who] = watched_page(browser.new_context(viewport=DESKTOP))
        pages[who].context.set_default_timeout(30_000)
        pages[who].broken = []
        pages[who].on(
            "response",
            lambda response, page=pages[who]: (
                page.broken.append(f"{response.status} {response.url}")
                if response.status >= 400 and response.request.resource_type != "document"
                else None
            ),
        )
        if who:
            log_in(pages[who], live_server, who)

    for stop in TOUR:
        page = pages[stop.who]
        url = live_server.url + stop.path.format(**tour_world)
        problems: list[str] = []
        for width, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            page.set_viewport_size(viewport)
            page.js_errors.clear()
            page.broken.clear()
            response = page.goto(url)
            page.wait_for_load_state("load")
            page.screenshot(path=str(SCREENSHOTS / f"{stop.name}-{width}.png"), full_page=True)
            found = [] if response.status == stop.status else [f"status {response.status}"]
            if width == "phone" and (wider := sideways_scroll(page)) > 0:
                found.append(f"scrolls sideways by {wider}px")
            if not page.evaluate(f"({UNFOCUSED}) || {AUTOFOCUSED}"):
                found.append("something has the focus as the page opens")
            found += audit(page)
            found += [f"failed to load: {what}" for what in page.broken]
            problems += [f"{width}: {problem}" for problem in found]
        if problems:
            failed[f"{stop.name} ({stop.path})"] = problems

    # On a phone the main navigation folds behind a Menu button, opened and closed by
    # keyboard or pointer.
    page = pages[OWNER]
    page.set_viewport_size(PHONE)
    page.goto(f"{live_server.url}/")
    nav = page.get_by_role("navigation", name="Main")
    menu = nav.get_by_role("button", name="Menu")
    expect(nav.get_by_role("link", name="Leaderboard")).to_be_hidden()
    menu.click()
    expect(menu).to_have_attribute("aria-expanded", "true")
    expect(nav.get_by_role("link", name="Leaderboard")).to_be_visible()
    expect(nav.get_by_role("button", name="Log out")).to_be_visible()
    page.screenshot(path=str(SCREENSHOTS / "menu-phone.png"))
    page.keyboard.press("Escape")
    expect(menu).to_have_attribute("aria-expanded", "false")
    expect(menu).to_be_focused()
    expect(nav.get_by_role("link", name="Leaderboard")).to_be_hidden()
    page.set_viewport_size(DESKTOP)  # wide: the links show without the button
    expect(menu).to_be_hidden()
    expect(nav.get_by_role("link", name="Leaderboard")).to_be_visible()

    for page in pages.values():
        page.context.close()
    report = "\n".join(
        f"{name}:\n" + "\n".join(f"  - {p}" for p in dict.fromkeys(problems))
        for name, problems in failed.items()
    )
    assert not failed, f"{len(failed)} of {len(TOUR)} pages have problems:\n{report}"


BROKEN = """<!doctype html><html><head><title>Broken</title></head><body>
<a class="skip-link" href="#nowhere">Skip</a>
<header><nav>Unlabelled</nav></header>
<main id="main"><h1>One</h1><h1>Two</h1><h3>Skipped a level</h3>
<p style="color: #bbb; background: #fff">Pale grey on white</p>
<input type="text" name="alone"><select name="choice"><option>a</option></select>
<img src="data:,"><div role="img"></div><button></button></main>
</body></html>"""


def test_the_audit_finds_what_it_looks_for(page):
    problems = audit(page_with(page, BROKEN))
    expected = [
        "2 <h1> elements",
        "heading skips from h1 to h3",
        "no labelled <nav> in the header",
        "no <footer>",
        "no skip link to <main>",
        "no lang on <html>",
        "form control without a label: <input",
        "form control without a label: <select",
        "form control without a label: <button",
        "image without alt",
        "role=img without a name",
        "contrast 1.92:1",
        "the focused skip link shows no focus ring",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, "\n".join(problems))
    assert len(problems) == len(expected), problems


def page_with(page, html: str):
    page.set_content(html)
    return page
