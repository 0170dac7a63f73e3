"""Template tags for evaluation: the per-version evaluation panel the adapter page includes,
the head snippet (styles, and a no-JavaScript refresh while a run is live), and number
formatting for scores."""

from __future__ import annotations

from django import template
from django.template.loader import render_to_string
from django.urls import NoReverseMatch, reverse
from django.utils.safestring import SafeString

from contributions.models import Adapter, AdapterVersion
from contributions.selectors import user_is_maintainer
from evaluation import review_selectors

register = template.Library()


@register.inclusion_tag("evaluation/_panel.html", takes_context=True)
def evaluation_panel(context: template.Context, version: AdapterVersion) -> dict:
    """``{% evaluation_panel version %}``: progress, scores, rules, outcome, log, decisions,
    appeal form and test-set scores of one version, for its owner or a maintainer."""
    request = context["request"]
    panel = review_selectors.evaluation_panel(user=request.user, version=version)
    run = panel.report.run if panel.report else None
    return {
        "panel": panel,
        "version": version,
        "adapter_id": version.adapter_id,
        "progress_url": progress_url(run.pk) if run is not None else "",
        "request": request,
        "csrf_token": context.get("csrf_token"),
        "here": request.get_full_path(),
    }


@register.simple_tag(takes_context=True)
def evaluation_head(context: template.Context, adapter: Adapter | None = None) -> SafeString:
    """``{% evaluation_head adapter %}`` in the page's head: the panel's styles and, while any
    run of the adapter is queued or running, a refresh every 5 s for browsers without
    JavaScript (with JavaScript, the panel's script polls the progress API instead)."""
    live = adapter is not None and review_selectors.adapter_has_live_run(adapter=adapter)
    return SafeString(render_to_string("evaluation/_head.html", {"live": live}))


def progress_url(run_id: int) -> str:
    """The runs API's progress endpoint, ``/api/v1/runs/<id>/progress/``."""
    try:
        return reverse("evaluation-api:run-progress", kwargs={"run_id": run_id})
    except NoReverseMatch:
        return f"/api/v1/runs/{run_id}/progress/"


@register.filter
def score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


@register.filter
def signed(value: float | None) -> str:
    """A difference with its sign, and a true minus sign."""
    if value is None:
        return "–"
    return f"{value:+.3f}".replace("-", "−")


@register.filter
def seconds(value: float | None) -> str:
    if value is None:
        return "–"
    value = float(value)
    if value < 60:
        return f"{value:.1f} s"
    minutes, rest = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


@register.filter
def subtract(value: float | None, other: float | None) -> float | None:
    if value is None or other is None:
        return None
    return value - other


DECISION_PAST = {"approve": "Approved", "reject": "Rejected", "suspend": "Suspended"}


@register.filter
def decision_past(decision: str) -> str:
    return DECISION_PAST.get(decision, decision)


@register.filter
def is_maintainer(user) -> bool:
    """``{% if user|is_maintainer %}``: for links only; views check access themselves."""
    return user_is_maintainer(user)
