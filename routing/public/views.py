"""Public model cards and contributor profiles: no login, reads in selectors. Anything a
visitor may not see answers the site's 404, worded the same whether it exists or not."""

from __future__ import annotations

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe

from routing.public import selectors


@require_safe
def model_card(request: HttpRequest, model_id: str) -> HttpResponse:
    owner, _, slug = model_id.partition("/")
    card = selectors.model_card(owner=owner, slug=slug)
    if card is None:
        raise Http404
    return render(request, "public/model_card.html", {"card": card})


@require_safe
def contributor(request: HttpRequest, username: str) -> HttpResponse:
    profile = selectors.contributor_profile(username=username)
    if profile is None:
        raise Http404
    return render(request, "public/contributor.html", {"profile": profile})
