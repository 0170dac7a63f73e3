"""Template tags for the public API's usage on portal pages."""

from __future__ import annotations

from django import template

from contributions.models import Adapter
from routing.usage_selectors import adapter_usage_daily

register = template.Library()

ADAPTER_USAGE_DAYS = 14


@register.inclusion_tag("routing/_adapter_usage.html")
def adapter_usage_panel(adapter: Adapter) -> dict:
    """``{% adapter_usage_panel adapter %}``: requests and tokens the adapter served per UTC
    day over the last two weeks, all versions together. The caller has already checked
    that the viewer may see the adapter."""
    days = adapter_usage_daily(adapter_id=adapter.pk, days=ADAPTER_USAGE_DAYS)
    peak = max((d.totals.requests for d in days), default=0)
    return {
        "days": list(reversed(days)),  # newest first, like the page's other tables
        "peak": peak,
        "total_requests": sum(d.totals.requests for d in days),
        "total_tokens": sum(d.totals.total_tokens for d in days),
        "span": ADAPTER_USAGE_DAYS,
    }
