"""The review queue, maintainers' decisions, appeals and the evaluation panel on the adapter
page, through Django's test client and the API client, on the real PostgreSQL.

No model runs here: versions, runs, scores and rule verdicts are rows built directly in the
database. Personas: anonymous, the owner (``contributor``), another contributor and a
maintainer; every page and endpoint is checked for each.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
from datetime import timedelta

import pytest
from django.core.files.base import ContentFile
from django.db import connections
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from contributions.models import AdapterVersion, AuditEvent
from evaluation import models as em
from evaluation.services import review as review_services
from tessera.errors import DomainError
from tests.factories import AdapterFactory

pytestmark = pytest.mark.django_db

Status = AdapterVersion.Status
HIDDEN_TEXT = "HIDDEN-EXAMPLE-zebra-quartz-7731"
HIDDEN_TARGET = "HIDDEN-TARGET-walrus-5519"
_sha = itertools.count(1)


# --- rows built directly in the database ----------------------------------------------------


def make_suite() -> dict[str, em.Task]:
    """A skill suite (arithmetic) and the general suite, each with one public and one hidden
    example; the hidden ones carry text that must never reach a page."""
    tasks = {}
    for slug, purpose, tags in [
        ("arithmetic", em.Suite.Purpose.SKILL, ["arithmetic"]),
        ("general", em.Suite.Purpose.GENERAL, []),
    ]:
        suite, _ = em.Suite.objects.get_or_create(
            slug=slug, defaults={"title": slug.title(), "purpose": purpose}
        )
        suite_version, _ = em.SuiteVersion.objects.get_or_create(
            suite=suite, number=1, defaults={"source_sha256": "0" * 64}
        )
        task, created = em.Task.objects.get_or_create(
            suite_version=suite_version,
            slug=f"{slug}-task",
            defaults={
                "title": "Three-digit addition" if slug == "arithmetic" else "General knowledge",
                "tags": tags,
                "metric": em.Task.Metric.EXACT_MATCH,
                "prompt_template": "{question}",
            },
        )
        if created:
            em.Example.objects.create(
                task=task, split="public", position=0, fields={"question": "1+1?"}, target="2"
            )
            em.Example.objects.create(
                task=task,
                split="hidden",
                position=0,
                fields={"question": HIDDEN_TEXT},
                target=HIDDEN_TARGET,
            )
        tasks[slug] = task
    return tasks


def make_version(
    adapter,
    *,
    number: int = 1,
    status: str = Status.PASSED,
    base_model=None,
    card: bytes | None = None,
    changed_ago: timedelta = timedelta(0),
) -> AdapterVersion:
    from contributions.selectors import base_model_active

    version = AdapterVersion(
        adapter=adapter,
        number=number,
        base_model=base_model or base_model_active(),
        status=status,
        status_changed_at=timezone.now() - changed_ago,
        config_file=f"adapters/{adapter.pk}/v{number}/adapter_config.json",
        weights_file=f"adapters/{adapter.pk}/v{number}/adapter_model.safetensors",
        config_sha256="c" * 64,
        weights_sha256=hashlib.sha256(str(next(_sha)).encode()).hexdigest(),
        size_bytes=1234,
        rank=4,
        alpha=8.0,
        dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        dtype="float32",
        tensor_count=8,
        parameter_count=4096,
        adapter_config={"r": 4},
    )
    if card is not None:
        version.card_file.save("README.md", ContentFile(card), save=False)
    version.save()
    return version


def make_run(
    version: AdapterVersion,
    *,
    status: str = em.EvaluationRun.Status.SUCCEEDED,
    passed: bool | None = True,
    needs_review: bool = True,
    adapter_score: float = 0.76,
    general_drop_ok: bool = True,
    log: str = "loaded base model\nscored arithmetic-task\n",
    progress: tuple[int, int] = (10, 10),
) -> em.EvaluationRun:
    tasks = make_suite()
    now = timezone.now()
    finished = status in (em.EvaluationRun.Status.SUCCEEDED, em.EvaluationRun.Status.FAILED)
    run = em.EvaluationRun.objects.create(
        version=version,
        status=status,
        queue="eval-cpu",
        attempts=1,
        started_at=None if status == em.EvaluationRun.Status.QUEUED else now - timedelta(minutes=9),
        finished_at=now if finished else None,
        duration_seconds=540.0 if finished else None,
        progress_done=progress[0],
        progress_total=progress[1],
        progress_label="scoring arithmetic-task",
        passed=passed if finished else None,
        needs_review=needs_review,
        log=log,
    )
    # created_at is auto_now_add: move it to when the run was queued, before it started.
    em.EvaluationRun.objects.filter(pk=run.pk).update(created_at=now - timedelta(minutes=10))
    run.refresh_from_db()
    if not finished:
        return run
    em.TaskResult.objects.create(
        run=run,
        task=tasks["arithmetic"],
        split="hidden",
        is_target=True,
        n=200,
        base_score=0.0,
        adapter_score=adapter_score,
        delta=adapter_score,
        ci_low=adapter_score - 0.06,
        ci_high=adapter_score + 0.06,
    )
    em.TaskResult.objects.create(
        run=run,
        task=tasks["general"],
        split="hidden",
        is_target=False,
        n=100,
        base_score=0.41,
        adapter_score=0.40,
        delta=-0.01,
        ci_low=-0.04,
        ci_high=0.02,
    )
    em.RuleResult.objects.create(
        run=run,
        rule="min_gain",
        passed=passed is not False,
        detail=f"Beats the base on Three-digit addition by {adapter_score:.2f} (needs 0.10).",
    )
    em.RuleResult.objects.create(
        run=run,
        rule="general_drop",
        passed=general_drop_ok,
        detail="General ability falls by 0.01 (at most 0.05 allowed).",
    )
    return run


def pending_version(adapter, **kwargs) -> AdapterVersion:
    """A version that passed, with a latest run asking for a maintainer."""
    version = make_version(adapter, **kwargs)
    make_run(version, needs_review=True)
    return version


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def adapter(contributor, base_model):
    return AdapterFactory(owner=contributor, slug="adder", title="Three-digit adder")


@pytest.fixture
def pending(adapter):
    return pending_version(adapter, card=b"# Adder\n\nAdds numbers.\n")


def client_for(user) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def api_for(user) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client


@pytest.fixture
def personas(contributor, other_contributor, maintainer) -> dict:
    return {
        "anonymous": None,
        "owner": contributor,
        "other": other_contributor,
        "maintainer": maintainer,
    }


def text(response) -> str:
    return response.content.decode()


def error_code(response) -> str:
    return response.json()["error"]["code"]


def api_url(name: str, **kwargs) -> str:
    return reverse(f"evaluation-api:{name}", kwargs=kwargs)


# --- the queue ------------------------------------------------------------------------------------


def test_the_queue_lists_waiting_versions_oldest_first_and_nothing_else(
    adapter, contributor, other_contributor, maintainer
):
    other_adapter = AdapterFactory(owner=other_contributor, slug="speller")
    newest = pending_version(adapter, number=1, changed_ago=timedelta(hours=1))
    oldest = pending_version(other_adapter, number=1, changed_ago=timedelta(days=2))
    middle = pending_version(adapter, number=2, changed_ago=timedelta(hours=5))
    # Not waiting for anyone: auto-admitted, admitted, failed, rejected, still running.
    auto = make_version(AdapterFactory(owner=contributor), status=Status.PASSED)
    make_run(auto, needs_review=False)
    for number, status in enumerate(
        [Status.ADMITTED, Status.FAILED, Status.REJECTED, Status.EVALUATING], start=3
    ):
        make_run(make_version(adapter, number=number, status=status), needs_review=True)

    response = api_for(maintainer).get(api_url("review-queue"))
    assert response.status_code == 200
    assert [item["version"]["id"] for item in response.json()] == [oldest.pk, middle.pk, newest.pk]

    page = text(client_for(maintainer).get(reverse("evaluation:review-queue")))
    positions = [page.index(f'id="queue-{v.pk}-heading"') for v in (oldest, middle, newest)]
    assert positions == sorted(positions)
    assert f'id="queue-{auto.pk}-heading"' not in page


def test_a_passed_version_whose_latest_run_needs_no_review_is_not_queued(adapter, maintainer):
    version = make_version(adapter)
    make_run(version, needs_review=True)
    later = make_run(version, needs_review=False)  # re-evaluated since
    em.EvaluationRun.objects.filter(pk=later.pk).update(
        created_at=timezone.now() + timedelta(minutes=1)
    )
    assert api_for(maintainer).get(api_url("review-queue")).json() == []


def test_a_queue_item_carries_the_full_report(pending, maintainer):
    item = api_for(maintainer).get(api_url("review-queue")).json()[0]
    assert item["version"]["owner"] == "owner"
    assert item["version"]["slug"] == "adder"
    assert item["appealed"] is False
    report = item["report"]
    assert report["duration_seconds"] == 540.0
    assert report["queue_seconds"] is not None
    target = report["task_results"][0]
    assert target["title"] == "Three-digit addition"
    assert target["is_target"] is True
    assert (target["base_score"], target["adapter_score"]) == (0.0, 0.76)
    assert target["ci_low"] == pytest.approx(0.70)
    assert [rule["passed"] for rule in report["rule_results"]] == [True, True]
    assert "Beats the base" in report["rule_results"][0]["detail"]
    assert item["model_card"] == "# Adder\n\nAdds numbers.\n"
    assert item["previous"] is None
    assert item["similar"] == []

    page = text(client_for(maintainer).get(reverse("evaluation:review-queue")))
    assert "Three-digit addition" in page
    assert "[+0.700, +0.820]" in page  # the 95% CI of the difference
    assert "Passed:" in page and "Beats the base on Three-digit addition" in page
    assert "9 min 0 s" in page  # the run's duration


def test_the_previous_versions_scores_are_shown(adapter, maintainer):
    v1 = make_version(adapter, number=1, status=Status.ADMITTED)
    make_run(v1, adapter_score=0.55, needs_review=False)
    v2 = pending_version(adapter, number=2)

    item = api_for(maintainer).get(api_url("review-version", version_id=v2.pk)).json()
    assert item["previous"]["number"] == 1
    assert item["previous"]["status"] == "admitted"
    assert item["previous"]["report"]["task_results"][0]["adapter_score"] == 0.55

    page = text(client_for(maintainer).get(reverse("evaluation:review-detail", args=[v2.pk])))
    assert "Previous version" in page
    assert "v1" in page and "0.550" in page  # v1's score next to v2's 0.760
    assert "0.760" in page


def test_similar_weights_to_an_admitted_adapter_are_flagged(
    pending, adapter, other_contributor, maintainer
):
    admitted = make_version(
        AdapterFactory(owner=other_contributor, slug="copycat"), status=Status.ADMITTED
    )
    base = [1.0, 0.5, -0.25, 0.0] * 64
    em.WeightSketch.objects.create(version=admitted, vector=base)
    em.WeightSketch.objects.create(version=pending, vector=[x + 0.001 for x in base])

    item = api_for(maintainer).get(api_url("review-queue")).json()[0]
    assert [s["version"]["slug"] for s in item["similar"]] == ["copycat"]
    assert item["similar"][0]["similarity"] > 0.99

    page = text(client_for(maintainer).get(reverse("evaluation:review-queue")))
    assert "Nearly identical weights" in page
    assert "other/copycat v1" in page
    assert "similar to an admitted adapter" in page


def test_dissimilar_weights_are_not_flagged(pending, other_contributor, maintainer):
    admitted = make_version(AdapterFactory(owner=other_contributor), status=Status.ADMITTED)
    em.WeightSketch.objects.create(version=admitted, vector=[1.0, 0.0] * 128)
    em.WeightSketch.objects.create(version=pending, vector=[0.0, 1.0] * 128)
    assert api_for(maintainer).get(api_url("review-queue")).json()[0]["similar"] == []
    assert "Nearly identical" not in text(
        client_for(maintainer).get(reverse("evaluation:review-queue"))
    )


def test_the_model_card_is_escaped_never_rendered_as_html(adapter, maintainer, contributor):
    card = b'# Hi\n<script>alert("owned")</script>\n<img src=x onerror=alert(1)>\n'
    version = pending_version(adapter, card=card)
    for url in [
        reverse("evaluation:review-queue"),
        reverse("evaluation:review-detail", args=[version.pk]),
    ]:
        page = text(client_for(maintainer).get(url))
        assert "&lt;script&gt;alert(&quot;owned&quot;)&lt;/script&gt;" in page
        assert '<script>alert("owned")' not in page
        assert "<img src=x" not in page


def test_hidden_examples_never_appear_on_any_page_or_endpoint(
    pending, adapter, contributor, maintainer
):
    pages = [
        (maintainer, reverse("evaluation:review-queue")),
        (maintainer, reverse("evaluation:review-detail", args=[pending.pk])),
        (maintainer, reverse("portal:adapter-detail", args=[adapter.pk])),
        (contributor, reverse("portal:adapter-detail", args=[adapter.pk])),
        (contributor, reverse("evaluation:test-sets", args=[adapter.pk])),
        (None, reverse("evaluation:policy")),
    ]
    for user, url in pages:
        page = text(client_for(user).get(url))
        assert HIDDEN_TEXT not in page, url
        assert HIDDEN_TARGET not in page, url
    for url in [api_url("review-queue"), api_url("review-version", version_id=pending.pk)]:
        body = text(api_for(maintainer).get(url))
        assert HIDDEN_TEXT not in body and HIDDEN_TARGET not in body


# --- access -------------------------------------------------------------------------------------

MAINTAINER_PAGES = ["evaluation:review-queue", "evaluation:review-detail"]


@pytest.mark.parametrize("name", MAINTAINER_PAGES)
@pytest.mark.parametrize(
    ("persona", "expected"),
    [("anonymous", 302), ("owner", 403), ("other", 403), ("maintainer", 200)],
)
def test_review_pages_are_for_maintainers_only(pending, personas, name, persona, expected):
    args = [pending.pk] if name == "evaluation:review-detail" else []
    response = client_for(personas[persona]).get(reverse(name, args=args))
    assert response.status_code == expected
    if expected == 302:
        assert response["Location"].startswith(reverse("portal:login"))


@pytest.mark.parametrize("decision", ["approve", "reject", "suspend"])
@pytest.mark.parametrize(
    ("persona", "expected"), [("anonymous", 302), ("owner", 403), ("other", 403)]
)
def test_only_maintainers_may_post_a_decision_in_the_portal(
    pending, personas, decision, persona, expected
):
    url = reverse("evaluation:review-decide", args=[pending.pk, decision])
    response = client_for(personas[persona]).post(url, {f"{decision}-reason": "Because."})
    assert response.status_code == expected
    pending.refresh_from_db()
    assert pending.status == Status.PASSED
    assert not em.ReviewDecision.objects.exists()


def test_an_unknown_decision_is_a_404(pending, maintainer):
    url = reverse("evaluation:review-decide", args=[pending.pk, "promote"])
    assert client_for(maintainer).post(url, {"promote-reason": "x"}).status_code == 404


@pytest.mark.parametrize(
    ("persona", "expected"),
    [("anonymous", 401), ("owner", 403), ("other", 403), ("maintainer", 200)],
)
def test_the_queue_api_is_for_maintainers_only(pending, personas, persona, expected):
    for url in [api_url("review-queue"), api_url("review-version", version_id=pending.pk)]:
        response = api_for(personas[persona]).get(url)
        assert response.status_code == expected
        if expected != 200:
            assert error_code(response) in {"not_authenticated", "permission_denied"}


@pytest.mark.parametrize("decision", ["approve", "reject", "suspend"])
@pytest.mark.parametrize(
    ("persona", "expected"), [("anonymous", 401), ("owner", 403), ("other", 403)]
)
def test_decision_endpoints_are_for_maintainers_only(
    pending, personas, decision, persona, expected
):
    response = api_for(personas[persona]).post(
        api_url(f"review-{decision}", version_id=pending.pk), {"reason": "Because."}
    )
    assert response.status_code == expected
    pending.refresh_from_db()
    assert pending.status == Status.PASSED
    assert not em.ReviewDecision.objects.exists()


def test_a_decision_on_a_missing_version_is_a_404(maintainer, base_model):
    response = api_for(maintainer).post(
        api_url("review-approve", version_id=999999), {"reason": "x"}
    )
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("persona", "expected"),
    [("anonymous", 200), ("owner", 200), ("other", 200), ("maintainer", 200)],
)
def test_the_admission_policy_page_is_public(personas, persona, expected, base_model):
    response = client_for(personas[persona]).get(reverse("evaluation:policy"))
    assert response.status_code == expected
    page = text(response)
    assert "Hidden splits, and why" in page
    assert "Review mode" in page


def test_the_nav_links_the_policy_for_everyone_and_the_queue_for_maintainers(
    contributor, maintainer, base_model
):
    queue = reverse("evaluation:review-queue")
    for user, sees_queue in [(None, False), (contributor, False), (maintainer, True)]:
        page = text(client_for(user).get(reverse("portal:home")))
        assert reverse("evaluation:policy") in page
        assert (f'href="{queue}"' in page) is sees_queue


# --- decisions ----------------------------------------------------------------------------------


def test_approving_admits_records_the_decision_and_mails_the_contributor(
    pending, maintainer, mailoutbox, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = api_for(maintainer).post(
            api_url("review-approve", version_id=pending.pk),
            {"reason": "Clear gain on addition, no harm elsewhere."},
        )
    assert response.status_code == 200, response.content
    assert response.json()["version"]["status"] == "admitted"
    pending.refresh_from_db()
    assert pending.status == Status.ADMITTED
    decision = em.ReviewDecision.objects.get(version=pending)
    assert (decision.decision, decision.maintainer) == ("approve", maintainer)
    assert decision.reason == "Clear gain on addition, no harm elsewhere."
    event = AuditEvent.objects.get(version=pending, to_status=Status.ADMITTED)
    assert (event.actor, event.from_status) == (maintainer, Status.PASSED)
    assert event.reason == decision.reason
    assert len(mailoutbox) == 1
    mail = mailoutbox[0]
    assert mail.to == ["owner@example.org"]
    assert "owner/adder v1" in mail.subject
    assert "approved" in mail.body
    assert "Clear gain on addition, no harm elsewhere." in mail.body
    assert f"/adapters/{pending.adapter_id}/#version-1" in mail.body
    # Out of the queue.
    assert api_for(maintainer).get(api_url("review-queue")).json() == []


def test_a_maintainer_approves_from_the_review_page(
    pending, maintainer, mailoutbox, django_capture_on_commit_callbacks
):
    client = client_for(maintainer)
    page = text(client.get(reverse("evaluation:review-detail", args=[pending.pk])))
    assert "Reason to approve" in page and "Reason to reject" in page
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            reverse("evaluation:review-decide", args=[pending.pk, "approve"]),
            {"approve-reason": "Solid."},
            follow=True,
        )
    assert response.redirect_chain[-1][0] == reverse("evaluation:review-queue")
    assert "owner/adder v1 approved and admitted" in text(response)
    pending.refresh_from_db()
    assert pending.status == Status.ADMITTED
    assert len(mailoutbox) == 1


def test_rejecting_records_the_decision_and_mails_the_contributor_about_the_appeal(
    pending, maintainer, contributor, mailoutbox, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = api_for(maintainer).post(
            api_url("review-reject", version_id=pending.pk), {"reason": "Trained on the test set."}
        )
    assert response.status_code == 200
    pending.refresh_from_db()
    assert pending.status == Status.REJECTED
    assert em.ReviewDecision.objects.get(version=pending).decision == "reject"
    event = AuditEvent.objects.get(version=pending, to_status=Status.REJECTED)
    assert (event.actor, event.reason) == (maintainer, "Trained on the test set.")
    assert len(mailoutbox) == 1
    assert "rejected" in mailoutbox[0].body
    assert "appeal" in mailoutbox[0].body

    # The contributor sees the decision, its reason and the appeal form on the adapter page.
    page = text(
        client_for(contributor).get(reverse("portal:adapter-detail", args=[pending.adapter_id]))
    )
    assert "Rejected</strong> by maint" in page
    assert "Trained on the test set." in page
    assert reverse("evaluation:appeal", args=[pending.adapter_id, 1]) in page


def test_suspending_an_admitted_version_from_the_adapter_page(
    adapter, maintainer, contributor, mailoutbox, django_capture_on_commit_callbacks
):
    version = make_version(adapter, status=Status.ADMITTED)
    make_run(version, needs_review=False)
    adapter_page = reverse("portal:adapter-detail", args=[adapter.pk])
    client = client_for(maintainer)
    page = text(client.get(adapter_page))
    assert "Suspend v1" in page
    assert "Suspend v1" not in text(client_for(contributor).get(adapter_page))
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            reverse("evaluation:review-decide", args=[version.pk, "suspend"]),
            {"suspend-reason": "License dispute.", "suspend-next": f"{adapter_page}#version-1"},
        )
    assert response.status_code == 302
    assert response["Location"] == f"{adapter_page}#version-1"
    version.refresh_from_db()
    assert version.status == Status.SUSPENDED
    assert AuditEvent.objects.filter(version=version, to_status=Status.SUSPENDED).count() == 1
    assert em.ReviewDecision.objects.get(version=version).decision == "suspend"
    assert "suspended" in mailoutbox[0].body and "License dispute." in mailoutbox[0].body


def test_suspending_through_the_api(pending, maintainer):
    response = api_for(maintainer).post(
        api_url("review-suspend", version_id=pending.pk), {"reason": "Under investigation."}
    )
    assert response.status_code == 200
    pending.refresh_from_db()
    assert pending.status == Status.SUSPENDED


def test_an_unsafe_next_url_is_ignored(pending, maintainer):
    response = client_for(maintainer).post(
        reverse("evaluation:review-decide", args=[pending.pk, "reject"]),
        {"reject-reason": "No.", "reject-next": "https://evil.example/"},
    )
    assert response["Location"] == reverse("evaluation:review-queue")


@pytest.mark.parametrize("decision", ["approve", "reject", "suspend"])
@pytest.mark.parametrize("reason", ["", "   \n "])
def test_a_decision_without_a_reason_is_refused_and_changes_nothing(
    pending, maintainer, mailoutbox, decision, reason
):
    response = api_for(maintainer).post(
        api_url(f"review-{decision}", version_id=pending.pk), {"reason": reason}
    )
    assert response.status_code == 400
    assert error_code(response) == "reason_required"
    response = api_for(maintainer).post(api_url(f"review-{decision}", version_id=pending.pk), {})
    assert error_code(response) == "reason_required"

    response = client_for(maintainer).post(
        reverse("evaluation:review-decide", args=[pending.pk, decision]),
        {f"{decision}-reason": reason},
    )
    assert response.status_code == 400
    assert "reason_required" in text(response)

    pending.refresh_from_db()
    assert pending.status == Status.PASSED
    assert not em.ReviewDecision.objects.exists()
    assert not AuditEvent.objects.filter(version=pending, from_status=Status.PASSED).exists()
    assert mailoutbox == []


@pytest.mark.parametrize(
    ("status", "decision"),
    [
        (Status.ADMITTED, "approve"),
        (Status.REJECTED, "approve"),
        (Status.REJECTED, "reject"),
        (Status.ADMITTED, "reject"),
        (Status.WITHDRAWN, "suspend"),
        (Status.SUSPENDED, "suspend"),
        (Status.EVALUATING, "approve"),
    ],
)
def test_a_decision_on_a_version_in_the_wrong_state_is_a_conflict(
    adapter, maintainer, status, decision
):
    version = make_version(adapter, status=status)
    response = api_for(maintainer).post(
        api_url(f"review-{decision}", version_id=version.pk), {"reason": "Because."}
    )
    assert response.status_code == 409
    assert error_code(response) == "status_conflict"
    version.refresh_from_db()
    assert version.status == status
    assert not em.ReviewDecision.objects.exists()

    page = client_for(maintainer).post(
        reverse("evaluation:review-decide", args=[version.pk, decision]),
        {f"{decision}-reason": "Because."},
    )
    assert page.status_code == 409
    assert "status_conflict" in text(page)


def test_two_maintainers_approving_at_once_admit_the_version_exactly_once(
    pending, maintainer, mailoutbox, django_capture_on_commit_callbacks
):
    first = AdapterVersion.objects.get(pk=pending.pk)
    second = AdapterVersion.objects.get(pk=pending.pk)  # stale: loaded before the first acts
    with django_capture_on_commit_callbacks(execute=True):
        review_services.review_approve(version=first, actor=maintainer, reason="Looks good.")
        with pytest.raises(DomainError) as refused:
            review_services.review_approve(version=second, actor=maintainer, reason="Me too.")
    assert refused.value.code == "status_conflict"
    assert AuditEvent.objects.filter(version=pending, to_status=Status.ADMITTED).count() == 1
    assert em.ReviewDecision.objects.filter(version=pending).count() == 1
    assert em.ReviewDecision.objects.get(version=pending).reason == "Looks good."
    assert len(mailoutbox) == 1


@pytest.mark.django_db(transaction=True)
def test_two_approvals_racing_in_two_threads_admit_exactly_once(
    contributor, maintainer, base_model, mailoutbox
):
    version = pending_version(AdapterFactory(owner=contributor))
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def approve(reason: str) -> None:
        try:
            mine = AdapterVersion.objects.get(pk=version.pk)  # each thread its own object
            start.wait()
            review_services.review_approve(version=mine, actor=maintainer, reason=reason)
            outcomes.append("admitted")
        except DomainError as exc:
            outcomes.append(exc.code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=approve, args=(f"Yes ({n}).",)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["admitted", "status_conflict"]
    assert AuditEvent.objects.filter(version=version, to_status=Status.ADMITTED).count() == 1
    assert em.ReviewDecision.objects.filter(version=version).count() == 1
    assert len(mailoutbox) == 1  # the loser's decision and e-mail were rolled back


def test_a_second_approval_through_the_api_is_a_conflict(pending, maintainer):
    client = api_for(maintainer)
    url = api_url("review-approve", version_id=pending.pk)
    assert client.post(url, {"reason": "Yes."}).status_code == 200
    response = client.post(url, {"reason": "Yes again."})
    assert response.status_code == 409
    assert error_code(response) == "status_conflict"
    assert em.ReviewDecision.objects.count() == 1


def test_services_refuse_a_contributor_acting_as_a_maintainer(pending, contributor):
    with pytest.raises(DomainError) as refused:
        review_services.review_reject(version=pending, actor=contributor, reason="Mine.")
    assert refused.value.code == "not_maintainer"


# --- appeals --------------------------------------------------------------------------------------


@pytest.fixture
def rejected(pending, maintainer):
    return review_services.review_reject(
        version=pending, actor=maintainer, reason="No improvement on the hidden split."
    )


def appeal_url(version) -> str:
    return api_url("version-appeal", adapter_id=version.adapter_id, number=version.number)


def test_an_appeal_puts_a_rejected_version_back_in_the_queue_flagged(
    rejected, contributor, maintainer
):
    response = api_for(contributor).post(
        appeal_url(rejected), {"message": "The gain is real: see my own test set."}
    )
    assert response.status_code == 201
    assert response.json()["message"] == "The gain is real: see my own test set."
    rejected.refresh_from_db()
    assert rejected.status == Status.PASSED
    event = AuditEvent.objects.get(version=rejected, action="review.appealed")
    assert (event.from_status, event.to_status, event.actor) == (
        Status.REJECTED,
        Status.PASSED,
        contributor,
    )

    item = api_for(maintainer).get(api_url("review-queue")).json()[0]
    assert item["version"]["id"] == rejected.pk
    assert item["appealed"] is True
    assert item["appeal"]["message"] == "The gain is real: see my own test set."
    page = text(client_for(maintainer).get(reverse("evaluation:review-queue")))
    assert '<span class="flag">appealed</span>' in page
    assert "The gain is real: see my own test set." in page


def test_a_version_can_be_appealed_only_once(rejected, contributor, maintainer):
    client = api_for(contributor)
    assert client.post(appeal_url(rejected), {"message": "Please look again."}).status_code == 201
    response = client.post(appeal_url(rejected), {"message": "And again."})
    assert response.status_code == 409
    assert error_code(response) == "appeal_used"
    # Rejected a second time: still no second appeal.
    rejected.refresh_from_db()
    review_services.review_reject(version=rejected, actor=maintainer, reason="Still no.")
    response = client.post(appeal_url(rejected), {"message": "Third time lucky?"})
    assert (response.status_code, error_code(response)) == (409, "appeal_used")
    assert em.Appeal.objects.count() == 1
    page = text(
        client_for(contributor).get(reverse("portal:adapter-detail", args=[rejected.adapter_id]))
    )
    assert reverse("evaluation:appeal", args=[rejected.adapter_id, 1]) not in page
    assert "Please look again." in page


@pytest.mark.parametrize("message", ["", "  "])
def test_an_appeal_needs_a_message(rejected, contributor, message):
    response = api_for(contributor).post(appeal_url(rejected), {"message": message})
    assert (response.status_code, error_code(response)) == (400, "message_required")
    rejected.refresh_from_db()
    assert rejected.status == Status.REJECTED
    assert not em.Appeal.objects.exists()


def test_only_a_rejected_version_can_be_appealed(pending, contributor):
    response = api_for(contributor).post(appeal_url(pending), {"message": "Admit it faster."})
    assert (response.status_code, error_code(response)) == (409, "status_conflict")
    assert not em.Appeal.objects.exists()


@pytest.mark.parametrize(
    ("persona", "expected"), [("anonymous", 401), ("other", 404), ("maintainer", 403)]
)
def test_only_the_owner_may_appeal_through_the_api(rejected, personas, persona, expected):
    response = api_for(personas[persona]).post(appeal_url(rejected), {"message": "Let me in."})
    assert response.status_code == expected
    assert not em.Appeal.objects.exists()


@pytest.mark.parametrize(
    ("persona", "expected"), [("anonymous", 302), ("other", 404), ("maintainer", 403)]
)
def test_only_the_owner_may_appeal_in_the_portal(rejected, personas, persona, expected):
    url = reverse("evaluation:appeal", args=[rejected.adapter_id, 1])
    assert client_for(personas[persona]).get(url).status_code == expected
    assert (
        client_for(personas[persona]).post(url, {"message": "Let me in."}).status_code == expected
    )
    assert not em.Appeal.objects.exists()


def test_the_owner_appeals_from_the_adapter_page(rejected, contributor):
    client = client_for(contributor)
    url = reverse("evaluation:appeal", args=[rejected.adapter_id, 1])
    empty = client.post(url, {"message": ""})
    assert empty.status_code == 400
    assert "message_required" in text(empty)
    response = client.post(url, {"message": "Please reconsider."}, follow=True)
    assert "back in the review queue" in text(response)
    rejected.refresh_from_db()
    assert rejected.status == Status.PASSED
    page = text(client.get(reverse("portal:adapter-detail", args=[rejected.adapter_id])))
    assert "Appealed: waiting for a maintainer" in page
    assert "Please reconsider." in page


# --- the contributor's evaluation panel ----------------------------------------------------------


def adapter_page(user, adapter) -> str:
    response = client_for(user).get(reverse("portal:adapter-detail", args=[adapter.pk]))
    assert response.status_code == 200
    return text(response)


def test_the_panel_shows_scores_with_confidence_intervals_rules_and_the_outcome(
    pending, adapter, contributor
):
    page = adapter_page(contributor, adapter)
    assert "Evaluation and review" in page
    assert "Passed every rule; waiting for a maintainer" in page
    assert "Three-digit addition" in page and "General knowledge" in page
    assert "0.760" in page and "[+0.700, +0.820]" in page
    assert "−0.010" in page  # the general suite's small drop, with a true minus sign
    assert "Passed:</span>" in page and "General ability falls by 0.01" in page
    assert '<details class="run-log">' in page and "scored arithmetic-task" in page
    assert 'http-equiv="refresh"' not in page  # nothing is running


def test_a_refused_version_names_its_failed_rules(adapter, contributor):
    version = make_version(adapter, status=Status.FAILED)
    make_run(version, passed=False, needs_review=False, general_drop_ok=False)
    page = adapter_page(contributor, adapter)
    assert "Refused: failed min_gain, general_drop." in page
    assert 'class="rule-fail"' in page and "Failed:</span>" in page


def test_an_admitted_version_says_so_with_the_maintainers_reason(
    pending, adapter, contributor, maintainer
):
    review_services.review_approve(version=pending, actor=maintainer, reason="Great work.")
    page = adapter_page(contributor, adapter)
    assert "Admitted: it is part of the live mixture." in page
    assert "Approved</strong> by maint" in page and "Great work." in page


def test_a_running_run_shows_a_live_progress_bar_and_refreshes_without_javascript(
    adapter, contributor
):
    version = make_version(adapter, status=Status.EVALUATING)
    run = make_run(version, status=em.EvaluationRun.Status.RUNNING, progress=(3, 10))
    page = adapter_page(contributor, adapter)
    bar = re.search(r"<progress[^>]*>", page).group(0)
    assert 'value="3"' in bar and 'max="10"' in bar
    assert f'data-progress-url="/api/v1/runs/{run.pk}/progress/"' in bar
    assert "3 of 10 · scoring arithmetic-task" in page
    assert '<noscript><meta http-equiv="refresh" content="5"></noscript>' in page
    assert "tesseraProgressPolling" in page

    em.EvaluationRun.objects.filter(pk=run.pk).update(progress_done=7)
    assert 'value="7"' in adapter_page(contributor, adapter)


def test_a_queued_run_shows_an_indeterminate_bar(adapter, contributor):
    version = make_version(adapter, status=Status.QUEUED)
    make_run(version, status=em.EvaluationRun.Status.QUEUED, progress=(0, 0))
    page = adapter_page(contributor, adapter)
    bar = re.search(r"<progress[^>]*>", page).group(0)
    assert "value=" not in bar
    assert 'aria-live="polite">Queued' in page


def test_the_panel_shows_the_contributors_own_test_set_scores(pending, adapter, contributor):
    test_set = em.ContributorTestSet.objects.create(
        adapter=adapter,
        name="my sums",
        metric="exact_match",
        examples=[{"fields": {"prompt": "1+1"}, "target": "2", "choices": []}],
        source_sha256="0" * 64,
    )
    run = pending.evaluation_runs.get()
    em.TestSetResult.objects.create(
        run=run, test_set=test_set, n=1, base_score=0.25, adapter_score=0.875
    )
    page = adapter_page(contributor, adapter)
    assert "Your own test sets" in page
    assert "my sums" in page and "0.875" in page and "+0.625" in page


def test_other_contributors_never_see_the_panel(pending, adapter, other_contributor):
    url = reverse("portal:adapter-detail", args=[adapter.pk])
    assert client_for(other_contributor).get(url).status_code == 404


# --- a maintainer's own upload ----------------------------------------------------------------


@pytest.fixture
def own_pending(maintainer, base_model):
    """A version the maintainer uploaded themselves, waiting for review."""
    adapter = AdapterFactory(owner=maintainer, slug="maint-adder", title="Maintainer's adder")
    return pending_version(adapter)


@pytest.mark.parametrize("decision", ["approve", "reject", "suspend"])
def test_a_maintainer_cannot_decide_on_their_own_upload_through_the_api(
    own_pending, maintainer, decision
):
    response = api_for(maintainer).post(
        api_url(f"review-{decision}", version_id=own_pending.pk), {"reason": "Looks great."}
    )
    assert response.status_code == 403, response.content
    assert error_code(response) == "own_upload"
    own_pending.refresh_from_db()
    assert own_pending.status == Status.PASSED
    assert not em.ReviewDecision.objects.exists()
    assert not AuditEvent.objects.filter(version=own_pending, actor=maintainer).exists()


def test_a_maintainer_cannot_approve_their_own_upload_in_the_portal(own_pending, maintainer):
    client = client_for(maintainer)
    response = client.post(
        reverse("evaluation:review-decide", args=[own_pending.pk, "approve"]),
        {"approve-reason": "Mine is good."},
    )
    assert response.status_code == 403
    assert "own_upload" in text(response)
    own_pending.refresh_from_db()
    assert own_pending.status == Status.PASSED
    assert not em.ReviewDecision.objects.exists()


def test_the_review_pages_offer_no_decision_on_ones_own_upload(own_pending, maintainer):
    client = client_for(maintainer)
    queue = text(client.get(reverse("evaluation:review-queue")))
    assert "your upload: another maintainer decides" in queue
    assert f"Review v{own_pending.number}</a>" not in queue
    detail = text(client.get(reverse("evaluation:review-detail", args=[own_pending.pk])))
    assert "This is your own upload: another maintainer decides on it." in detail
    assert "Reason to approve" not in detail and "Reason to reject" not in detail
    adapter_page = text(client.get(reverse("portal:adapter-detail", args=[own_pending.adapter_id])))
    assert "Suspend v1" not in adapter_page


def test_another_maintainer_decides_on_a_maintainers_upload(own_pending, maintainer):
    from tests.factories import MaintainerFactory

    colleague = MaintainerFactory(username="colleague")
    client = client_for(colleague)
    detail = text(client.get(reverse("evaluation:review-detail", args=[own_pending.pk])))
    assert "Reason to approve" in detail
    response = api_for(colleague).post(
        api_url("review-approve", version_id=own_pending.pk), {"reason": "Checked it."}
    )
    assert response.status_code == 200
    own_pending.refresh_from_db()
    assert own_pending.status == Status.ADMITTED


# --- a suspended contributor goes back to review ----------------------------------------------


def needs_review(version: AdapterVersion, mode: str) -> bool:
    from evaluation.services.admission import admission_needs_review

    return admission_needs_review(version=version, mode=mode)


@pytest.mark.parametrize("mode", ["first", "never"])
def test_after_a_suspension_the_contributors_next_versions_wait_for_a_maintainer(
    adapter, maintainer, mode
):
    admitted = make_version(adapter, number=1, status=Status.ADMITTED)
    make_run(admitted, needs_review=False)
    nxt = make_version(adapter, number=2, status=Status.EVALUATING)
    assert needs_review(nxt, "first") is False  # a track record: admitted at once
    response = api_for(maintainer).post(
        api_url("review-suspend", version_id=admitted.pk), {"reason": "Leaks prompts."}
    )
    assert response.status_code == 200
    assert needs_review(nxt, mode) is True
    # Another contributor is not affected.
    other = AdapterFactory(slug="other-adder")
    make_version(other, number=1, status=Status.ADMITTED)
    assert needs_review(make_version(other, number=2, status=Status.EVALUATING), mode) is False


def test_a_maintainers_approval_after_the_suspension_restores_automatic_admission(
    adapter, maintainer
):
    first = make_version(adapter, number=1, status=Status.ADMITTED)
    review_services.review_suspend(version=first, actor=maintainer, reason="Pulled.")
    second = pending_version(adapter, number=2)
    third = make_version(adapter, number=3, status=Status.EVALUATING)
    assert needs_review(third, "first") is True
    review_services.review_approve(version=second, actor=maintainer, reason="Fixed now.")
    assert needs_review(third, "first") is False


def test_a_mixture_rollback_does_not_send_the_contributor_back_to_review(adapter, maintainer):
    from contributions.services import adapter_version_transition

    first = make_version(adapter, number=1, status=Status.ADMITTED)
    adapter_version_transition(
        version=first, to_status=Status.SUSPENDED, actor=maintainer, reason="Rolled back."
    )
    assert needs_review(make_version(adapter, number=2, status=Status.EVALUATING), "first") is False


def test_the_policy_page_says_a_suspension_sends_a_contributor_back_to_review(
    client, base_model, settings
):
    settings.TESSERA_ADMISSION_REVIEW = "first"
    page = text(client.get(reverse("evaluation:policy")))
    assert "A contributor whose adapter a maintainer suspended has every passing version" in page
