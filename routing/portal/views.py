"""The API tokens page: keys for the inference API, with their limits and usage (which
routing owns, so the page lives here rather than in contributions)."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from contributions import services
from contributions.portal import queries as contribution_queries
from contributions.portal.forms import TokenCreateForm
from routing import limits
from routing.portal import queries
from tessera.api import STATUS_BY_KIND
from tessera.errors import DomainError

# --- API tokens -------------------------------------------------------------------------

# The tokens page shows each key's usage over this many UTC days, today included.
TOKEN_USAGE_DAYS = 30


@login_required
def tokens(request: HttpRequest) -> HttpResponse:
    form = TokenCreateForm(request.POST if request.method == "POST" else None)
    context = {"form": form, "new_key": None, "new_token": None}
    status = 200
    if form.is_bound and form.is_valid():
        try:
            token, key = services.api_token_create(
                user=request.user,
                name=form.cleaned_data["name"],
                requests_per_minute=form.cleaned_data["requests_per_minute"],
                tokens_per_day=form.cleaned_data["tokens_per_day"],
            )
        except DomainError as exc:
            form.add_domain_error(exc)
            status = STATUS_BY_KIND[exc.kind]
        else:
            # Shown on this response only: the key is not stored, and not kept in the session.
            context.update(new_key=key, new_token=token, form=TokenCreateForm())
    context["tokens"] = queries.api_token_rows(user=request.user, usage_days=TOKEN_USAGE_DAYS)
    context["usage_days"] = TOKEN_USAGE_DAYS
    # Read live from the API's Redis, unlike the per-key usage (as of the last flush).
    context["user_quota"] = limits.user_quota_check_sync(user_id=request.user.pk)
    context["keys_allowed"] = settings.TESSERA_API_KEYS_PER_USER
    context["api_me_url"] = request.build_absolute_uri(reverse("api:me"))
    context["inference_url"] = settings.TESSERA_INFERENCE_URL
    response = render(
        request,
        "routing/tokens.html",
        context,
        status=max(status, 400) if form.is_bound and form.errors else status,
    )
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    try:
        token = contribution_queries.api_token_get_owned(user=request.user, token_id=token_id)
    except DomainError as exc:
        raise Http404(exc.message) from exc
    services.api_token_revoke(token=token, actor=request.user)
    messages.success(request, f"Token '{token.name}' revoked; requests with it now get 401.")
    return redirect("routing:tokens")
