"""The playground's API key: one per browser session, created on first use, short-lived.

Only a hash of an ApiToken's secret is stored, so a key cannot be read back once made. The
playground therefore makes a key for the session and keeps the raw value in the session
store, which is server-side (Django's database sessions: the cookie holds only the session
id), so the page and its scripts never see it. It is a real key of the person's own: the
inference API's per-key rate limit and daily quota apply to it, its usage shows on the API
tokens page, and revoking it there ends it (the next request gets a new one).

A fresh key per session must not become a way round the daily quota, so the keys are
bounded: each lives ``KEY_LIFETIME`` at most (older ones are revoked when a new one is
made, which also ends the keys of sessions that were logged out or abandoned), a person
gets at most ``KEYS_PER_DAY`` of them per UTC day, and each has the low limits below.
"""

from __future__ import annotations

import datetime as dt

from django.conf import settings
from django.http import HttpRequest
from django.utils import timezone

from contributions import services
from contributions.models import ApiToken
from tessera.errors import DomainError

# The name the key shows on the API tokens page; it also tells the playground its own keys.
KEY_LABEL = "Playground (browser session)"
SESSION_KEY = "routing.playground.key"
KEY_LIFETIME = dt.timedelta(hours=12)
KEYS_PER_DAY = 6
REQUESTS_PER_MINUTE = 10
TOKENS_PER_DAY = 20_000


def session_key(request: HttpRequest, *, renew: bool = False) -> str:
    """The raw key of this session's playground key, made now when there is none, it has
    expired or been revoked, or ``renew`` says the inference API refused it."""
    user = request.user
    stored = request.session.get(SESSION_KEY)
    now = timezone.now()
    if stored and not renew:
        alive = ApiToken.objects.filter(
            pk=stored.get("token_id"),
            user=user,
            name=KEY_LABEL,
            revoked_at__isnull=True,
            created_at__gt=now - KEY_LIFETIME,
        ).exists()
        if alive:
            return stored["key"]
    stale = ApiToken.objects.filter(user=user, name=KEY_LABEL, revoked_at__isnull=True).filter(
        created_at__lte=now - KEY_LIFETIME
    )
    if stored:
        stale = stale | ApiToken.objects.filter(
            pk=stored.get("token_id"), user=user, revoked_at__isnull=True
        )
    for token in stale:
        services.api_token_revoke(token=token, actor=user)
    midnight = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    made_today = ApiToken.objects.filter(
        user=user, name=KEY_LABEL, created_at__gte=midnight
    ).count()
    if made_today >= KEYS_PER_DAY:
        raise DomainError(
            "playground_keys_exhausted",
            "The playground has started too many sessions for you today; it opens again at "
            "midnight UTC. Your own API keys still work with the inference API.",
        )
    token, key = services.api_token_create(user=user, name=KEY_LABEL, **_limits())
    request.session[SESSION_KEY] = {"token_id": token.pk, "key": key}
    return key


def _limits() -> dict[str, int]:
    """The playground's limits, never above the deployment's defaults (which contributors
    may not exceed; a default daily quota of 0 means none, so any quota is lower)."""
    default_quota = settings.TESSERA_API_TOKENS_PER_DAY
    return {
        "requests_per_minute": min(REQUESTS_PER_MINUTE, settings.TESSERA_API_REQUESTS_PER_MINUTE),
        "tokens_per_day": min(TOKENS_PER_DAY, default_quota) if default_quota else TOKENS_PER_DAY,
    }
