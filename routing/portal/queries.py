"""Reads for the API tokens page: each key with its effective limits and its usage."""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser

from contributions.models import ApiToken
from contributions.portal.queries import api_token_list
from routing.limits import TokenLimits, token_limits
from routing.usage_selectors import UsageTotals, key_usage_totals


@dataclass(frozen=True)
class ApiTokenRow:
    token: ApiToken
    limits: TokenLimits
    usage: UsageTotals


def api_token_rows(*, user: AbstractBaseUser, usage_days: int) -> list[ApiTokenRow]:
    """The user's tokens with their effective limits and their usage over the last
    ``usage_days`` UTC days (as of the last usage flush)."""
    tokens = list(api_token_list(user=user))
    usage = key_usage_totals(token_ids=[token.pk for token in tokens], days=usage_days)
    return [
        ApiTokenRow(
            token=token,
            limits=token_limits(token=token),
            usage=usage.get(token.pk, UsageTotals()),
        )
        for token in tokens
    ]
