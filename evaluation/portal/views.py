"""Portal pages for evaluation: the admission policy, the maintainers' review queue and
decisions, appeals and contributors' test sets. Thin: a form checks the input's shape, a
service writes, a selector reads, a template renders.

Access: anonymous visitors are sent to log in; a contributor asking for a maintainer's
page gets 403; someone else's adapter is a 404, exactly as if it did not exist; maintainers
may look at every adapter but only its owner may appeal or attach test sets (403).
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from contributions import selectors
from contributions.models import Adapter, AdapterVersion
from evaluation import review_selectors
from evaluation.models import ReviewDecision
from evaluation.policy import policy_rules_in_words
from evaluation.portal.forms import AppealForm, DecisionForm, TestSetForm
from evaluation.services import review as review_services
from evaluation.services import test_sets as test_set_services
from tessera.api import STATUS_BY_KIND
from tessera.errors import DomainError

DECISIONS = ReviewDecision.Decision


def _http(exc: DomainError) -> Exception:
    """A selector's refusal as the portal shows it."""
    if exc.kind == "not_found":
        return Http404(exc.message)
    return PermissionDenied(exc.message)


def _visible_adapter(request: HttpRequest, adapter_id: int) -> Adapter:
    try:
        return selectors.adapter_get_visible(user=request.user, adapter_id=adapter_id)
    except DomainError as exc:
        raise _http(exc) from exc


def _owned_adapter(request: HttpRequest, adapter_id: int, what: str) -> Adapter:
    adapter = _visible_adapter(request, adapter_id)
    if adapter.owner_id != request.user.pk:
        raise PermissionDenied(f"Only the adapter's owner can {what}.")
    return adapter


# --- The admission policy (public) ------------------------------------------------------------


def policy(request: HttpRequest) -> HttpResponse:
    context = {
        "rules": policy_rules_in_words(),
        "review_mode": settings.TESSERA_ADMISSION_REVIEW,
    }
    return render(request, "evaluation/policy.html", context)


# --- The review queue (maintainers) ------------------------------------------------------------


@login_required
def review_queue(request: HttpRequest) -> HttpResponse:
    try:
        items = review_selectors.review_queue(user=request.user)
    except DomainError as exc:
        raise _http(exc) from exc
    return render(request, "evaluation/review_queue.html", {"items": items})


@login_required
def review_detail(request: HttpRequest, version_id: int) -> HttpResponse:
    return _detail_page(request, version_id)


def _detail_page(
    request: HttpRequest,
    version_id: int,
    *,
    bound: tuple[str, DecisionForm] | None = None,
    refusal: DomainError | None = None,
    status: int = 200,
) -> HttpResponse:
    try:
        item = review_selectors.review_item_get(user=request.user, version_id=version_id)
    except DomainError as exc:
        raise _http(exc) from exc
    allowed = review_services.review_decisions_open(version=item.version, actor=request.user)
    forms = {decision: DecisionForm(prefix=decision) for decision in allowed}
    if bound is not None and bound[0] in forms:
        forms[bound[0]] = bound[1]
    context = {
        "item": item,
        "forms": [(decision, DECISIONS(decision).label, forms[decision]) for decision in allowed],
        "refusal": refusal,
    }
    return render(request, "evaluation/review_detail.html", context, status=status)


@login_required
@require_POST
def review_decide(request: HttpRequest, version_id: int, decision: str) -> HttpResponse:
    if decision not in DECISIONS.values:
        raise Http404("No such decision.")
    try:
        version = review_selectors.review_version_get(user=request.user, version_id=version_id)
    except DomainError as exc:
        raise _http(exc) from exc
    form = DecisionForm(request.POST, prefix=decision)
    form.is_valid()  # every field is optional: the service judges the reason
    try:
        review_services.review_decide(
            version=version,
            actor=request.user,
            decision=decision,
            reason=form.cleaned_data.get("reason", ""),
        )
    except DomainError as exc:
        form.add_domain_error(exc)
        refusal = None if exc.details.get("field") else exc
        return _detail_page(
            request,
            version_id,
            bound=(decision, form),
            refusal=refusal,
            status=STATUS_BY_KIND[exc.kind],
        )
    name = f"{version.adapter.owner.get_username()}/{version.adapter.slug} v{version.number}"
    words = review_services.DECISION_WORDS[decision]
    messages.success(request, f"{name} {words}. The contributor has been told by e-mail.")
    return redirect(_safe_next(request, form.cleaned_data.get("next")))


def _safe_next(request: HttpRequest, target: str | None) -> str:
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return reverse("evaluation:review-queue")


# --- Appeals (the owner) --------------------------------------------------------------------


@login_required
def appeal(request: HttpRequest, adapter_id: int, number: int) -> HttpResponse:
    adapter = _owned_adapter(request, adapter_id, "appeal a decision")
    version = _version_of(adapter, number)
    form = AppealForm(request.POST if request.method == "POST" else None)
    status = 200
    if form.is_bound and form.is_valid():
        try:
            review_services.appeal_create(
                version=version, actor=request.user, message=form.cleaned_data["message"]
            )
        except DomainError as exc:
            form.add_domain_error(exc)
            status = STATUS_BY_KIND[exc.kind]
        else:
            messages.success(
                request,
                f"Version {number} is back in the review queue with your appeal. "
                "You will get an e-mail with the maintainers' decision.",
            )
            return redirect(
                reverse("portal:adapter-detail", args=[adapter.pk]) + f"#version-{number}"
            )
    if form.is_bound and form.errors:
        status = max(status, 400)
    panel = review_selectors.evaluation_panel(user=request.user, version=version)
    context = {"adapter": adapter, "version": version, "form": form, "panel": panel}
    return render(request, "evaluation/appeal.html", context, status=status)


def _version_of(adapter: Adapter, number: int) -> AdapterVersion:
    version = next((v for v in adapter.versions.all() if v.number == number), None)
    if version is None:
        raise Http404("No such version.")
    return version


# --- Contributors' test sets ----------------------------------------------------------------


@login_required
def test_sets(request: HttpRequest, adapter_id: int) -> HttpResponse:
    adapter = _visible_adapter(request, adapter_id)
    is_owner = adapter.owner_id == request.user.pk
    if request.method == "POST" and not is_owner:
        raise PermissionDenied("Only the adapter's owner can attach test sets.")
    form = TestSetForm(request.POST or None, request.FILES or None) if is_owner else None
    status = 200
    if form is not None and form.is_bound and form.is_valid():
        try:
            test_set = test_set_services.contributor_test_set_create(
                adapter=adapter,
                actor=request.user,
                name=form.cleaned_data["name"],
                metric=form.cleaned_data["metric"],
                jsonl=form.jsonl(),
            )
        except DomainError as exc:
            form.add_domain_error(exc)
            status = STATUS_BY_KIND[exc.kind]
        else:
            messages.success(
                request,
                f"Test set '{test_set.name}' attached with {len(test_set.examples)} examples. "
                "The next evaluation run scores it.",
            )
            return redirect("evaluation:test-sets", adapter_id=adapter.pk)
    if form is not None and form.is_bound and form.errors:
        status = max(status, 400)
    _, rows = review_selectors.adapter_test_sets(user=request.user, adapter_id=adapter.pk)
    context = {"adapter": adapter, "rows": rows, "form": form, "is_owner": is_owner}
    return render(request, "evaluation/test_sets.html", context, status=status)
