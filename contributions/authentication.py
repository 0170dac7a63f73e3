"""API token authentication: ``Authorization: Bearer tsr_<prefix>_<secret>``.

DRF's own TokenAuthentication keeps keys in plain text; ours stores a SHA-256 only and
finds the row by a public prefix, comparing hashes in constant time.
"""

from __future__ import annotations

import hashlib
import hmac

from django.utils import timezone
from rest_framework import authentication, exceptions

from contributions.models import ApiToken

KEYWORDS = (b"bearer", b"token")
# last_used_at is informative; writing it on every request would put a DB write on the
# hot path, so it is refreshed at most once a minute.
LAST_USED_RESOLUTION_SECONDS = 60


def token_lookup(raw: str) -> ApiToken | None:
    try:
        scheme, prefix, secret = raw.split("_", 2)
    except ValueError:
        return None
    if scheme != "tsr" or not prefix or not secret:
        return None
    token = (
        ApiToken.objects.select_related("user")
        .filter(prefix=prefix, revoked_at__isnull=True)
        .first()
    )
    if token is None:
        return None
    digest = hashlib.sha256(secret.encode()).hexdigest()
    if not hmac.compare_digest(digest, token.key_hash):
        return None
    return token


class ApiTokenAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() not in KEYWORDS:
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Malformed Authorization header.")
        token = token_lookup(header[1].decode("latin-1"))
        if token is None or not token.user.is_active:
            raise exceptions.AuthenticationFailed("Invalid or revoked API token.")
        now = timezone.now()
        if (
            token.last_used_at is None
            or (now - token.last_used_at).total_seconds() > LAST_USED_RESOLUTION_SECONDS
        ):
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user, token

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'
