"""Review and the contributor's evaluation panel in a real browser: Debian's Chromium driven
by Playwright against pytest-django's live server (real PostgreSQL underneath).

A maintainer works through the review queue and approves a version with a reason; the
contributor then sees it admitted, with the reason, on the adapter page. A running run's
progress bar moves when the run's row changes, without the page reloading. Screenshots of
the queue and of the adapter page go to var/screenshots/ for people to look at.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from contributions.models import AdapterVersion
from evaluation import models as em
from evaluation.services import review as review_services
from tests.browser.conftest import BROWSER_MARKS, SCREENSHOTS, log_in, log_out
from tests.evaluation.test_review import make_run, make_version
from tests.factories import AdapterFactory

playwright_sync = pytest.importorskip("playwright.sync_api")

Status = AdapterVersion.Status

pytestmark = BROWSER_MARKS

CARD = b"""# Three-digit adder

A rank-4 LoRA trained on synthetic sums.

<script>alert("this must show as text")</script>
"""


def test_a_maintainer_approves_from_the_queue_and_the_contributor_sees_the_reason(
    page, live_server, base_model, contributor, other_contributor, maintainer
):
    expect = playwright_sync.expect
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    # The queue: the contributor's version (waiting two hours, with a previous version and a
    # model card), and an older, appealed version of another contributor's adapter whose
    # weights are nearly identical to an admitted one.
    adder = AdapterFactory(owner=contributor, slug="adder", title="Three-digit adder")
    v1 = make_version(adder, number=1, status=Status.ADMITTED)
    make_run(v1, adapter_score=0.55, needs_review=False)
    v2 = make_version(adder, number=2, card=CARD, changed_ago=timedelta(hours=2))
    make_run(v2)
    speller = AdapterFactory(owner=other_contributor, slug="speller", title="Speller")
    appealed = make_version(speller, number=1, changed_ago=timedelta(days=1))
    make_run(appealed, adapter_score=0.31)
    review_services.review_reject(version=appealed, actor=maintainer, reason="Gain too small.")
    review_services.appeal_create(
        version=appealed, actor=other_contributor, message="Please look at the CI again."
    )
    AdapterVersion.objects.filter(pk=appealed.pk).update(
        status_changed_at=v2.status_changed_at - timedelta(days=1)
    )
    em.WeightSketch.objects.create(version=v1, vector=[1.0, 0.5, -0.25, 0.0] * 64)
    em.WeightSketch.objects.create(version=appealed, vector=[1.0, 0.5, -0.25, 0.001] * 64)

    log_in(page, live_server, "maint")
    page.get_by_role("link", name="Review queue").click()
    expect(page.get_by_role("heading", name="Review queue", exact=True)).to_be_visible()
    headings = page.locator("section.queue-item h2")
    expect(headings).to_have_count(2)
    expect(headings.nth(0)).to_contain_text("other/speller v1")  # oldest first
    expect(headings.nth(1)).to_contain_text("owner/adder v2")
    expect(page.locator(".flag", has_text="appealed")).to_be_visible()
    expect(page.get_by_text("Nearly identical weights")).to_be_visible()
    expect(page.get_by_text("Please look at the CI again.")).to_be_visible()
    page.screenshot(path=str(SCREENSHOTS / "review-queue.png"), full_page=True)

    # Review the contributor's version: its report, the escaped model card, the previous
    # version's scores, then approve with a reason.
    page.get_by_role("link", name="Review v2").click()
    expect(page.get_by_role("heading", name="Three-digit adder v2")).to_be_visible()
    expect(page.locator("pre.model-card")).to_contain_text('<script>alert("this must show')
    expect(page.get_by_role("heading", name="Previous version")).to_be_visible()
    page.get_by_role("button", name="Approve v2").click()  # no reason: refused
    expect(page.get_by_text("(reason_required)")).to_be_visible()
    page.screenshot(path=str(SCREENSHOTS / "review-detail.png"), full_page=True)
    v2.refresh_from_db()
    assert v2.status == Status.PASSED
    page.get_by_label("Reason to approve").fill("A clear gain on addition and no general harm.")
    page.get_by_role("button", name="Approve v2").click()
    expect(page.get_by_role("status")).to_contain_text("owner/adder v2 approved and admitted")
    expect(page.locator("section.queue-item")).to_have_count(1)
    v2.refresh_from_db()
    assert v2.status == Status.ADMITTED
    assert em.ReviewDecision.objects.get(version=v2).maintainer == maintainer
    log_out(page)

    # The contributor sees the admission and the maintainer's reason on the adapter page.
    log_in(page, live_server, "owner")
    page.goto(f"{live_server.url}/adapters/{adder.pk}/")
    panel = page.locator("#evaluation-v2")
    expect(panel.locator(".outcome")).to_contain_text("Admitted: it is part of the live mixture.")
    expect(panel.locator(".decision")).to_contain_text("Approved by maint")
    expect(panel.locator(".decision")).to_contain_text(
        "A clear gain on addition and no general harm."
    )
    expect(page.locator("table .badge.status-admitted").first).to_have_text("admitted")

    # The public admission policy, linked from every page.
    page.get_by_role("link", name="Admission policy").click()
    expect(page.get_by_role("heading", name="Hidden splits, and why")).to_be_visible()
    page.screenshot(path=str(SCREENSHOTS / "admission-policy.png"), full_page=True)


def test_the_contributors_progress_bar_moves_while_the_run_is_running(
    page, live_server, base_model, contributor, maintainer
):
    expect = playwright_sync.expect
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    adder = AdapterFactory(owner=contributor, slug="adder", title="Three-digit adder")
    v1 = make_version(adder, number=1)
    make_run(v1)
    review_services.review_reject(
        version=v1, actor=maintainer, reason="The general suite drop needs explaining."
    )
    v2 = make_version(adder, number=2, status=Status.EVALUATING)
    run = make_run(v2, status=em.EvaluationRun.Status.RUNNING, progress=(3, 10))

    log_in(page, live_server, "owner")
    page.goto(f"{live_server.url}/adapters/{adder.pk}/")
    bar = page.locator(f"#run-progress-{run.pk}")
    expect(bar).to_be_visible()
    assert bar.evaluate("el => el.value") == 3
    assert bar.evaluate("el => el.max") == 10
    expect(page.locator(f"#run-progress-label-{run.pk}")).to_have_text(
        "3 of 10 · scoring arithmetic-task"
    )
    # The rejected v1 offers its one appeal.
    expect(page.get_by_label("Appeal the rejection of v1")).to_be_visible()
    page.evaluate("window.__notReloaded = true")

    em.EvaluationRun.objects.filter(pk=run.pk).update(
        progress_done=7, progress_label="scoring general-task"
    )
    page.wait_for_function(
        f"document.getElementById('run-progress-{run.pk}').value === 7", timeout=15_000
    )
    expect(page.locator(f"#run-progress-label-{run.pk}")).to_have_text(
        "7 of 10 · scoring general-task"
    )
    assert page.evaluate("window.__notReloaded === true"), "the bar moved by polling, no reload"
    page.screenshot(path=str(SCREENSHOTS / "adapter-evaluation.png"), full_page=True)
