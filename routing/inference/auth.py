"""API keys for the inference API: the portal's ``tsr_…`` tokens, checked per request.

The lookup is one indexed read by prefix (no write: last_used_at is refreshed at most once
a minute, as the REST API does). A revoked key or a deactivated user is refused at once.
"""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.http import HttpRequest
from django.utils import timezone

from contributions.authentication import LAST_USED_RESOLUTION_SECONDS, token_lookup
from contributions.models import ApiToken
from routing.inference.errors import unauthenticated


def _lookup(raw: str) -> ApiToken | None:
    token = token_lookup(raw)
    if token is None or not token.user.is_active:
        return None
    now = timezone.now()
    if (
        token.last_used_at is None
        or (now - token.last_used_at).total_seconds() > LAST_USED_RESOLUTION_SECONDS
    ):
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token


async def authenticate(request: HttpRequest) -> ApiToken:
    header = request.headers.get("Authorization", "")
    scheme, _, raw = header.partition(" ")
    if not header:
        raise unauthenticated(
            "You didn't provide an API key. Send it as 'Authorization: Bearer tsr_…'; "
            "create one on the portal's API tokens page."
        )
    if scheme.lower() != "bearer" or not raw.strip():
        raise unauthenticated("Malformed Authorization header; use 'Bearer <key>'.")
    token = await sync_to_async(_lookup)(raw.strip())
    if token is None:
        raise unauthenticated("Incorrect or revoked API key.")
    return token
