"""Links from the leaderboard to the public model cards and contributor profiles. The
leaderboard's rows carry model ids and display names, not whether a profile is public, so
the names that may link are read once per page (routing.public.selectors)."""

from __future__ import annotations

from django import template

from routing.public.selectors import public_profile_usernames

register = template.Library()


@register.simple_tag
def public_profiles() -> set[str]:
    """``{% public_profiles as profiles %}``: usernames whose profile page is public."""
    return public_profile_usernames()


@register.filter
def model_owner(model_id: str) -> str:
    """``ann/units`` → ``ann``: the username in a model id."""
    return str(model_id).partition("/")[0]
