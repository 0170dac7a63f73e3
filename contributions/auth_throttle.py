"""Throttles for signing in and signing up, counted in the cache.

The cache is Redis in production (tessera.settings CACHES), so every web process shares
one count per client. Each limit is a fixed window of TESSERA_AUTH_THROTTLE_WINDOW_SECONDS:
a counter that expires with its window. A fixed window lets a client spend up to twice a
limit across a window's edge; that is still a few dozen guesses where a script would make
thousands, and one INCR per attempt is all it costs.

* Failed log-ins, per client IP (TESSERA_LOGIN_FAILURES_PER_IP) and per username
  (TESSERA_LOGIN_FAILURES_PER_USERNAME): guessing one account's password from many
  addresses, or many accounts' from one, both run out. A successful log-in clears its
  username's count. Once a count is spent, further attempts are refused before the
  password is even checked.
* Sign-ups, per client IP (TESSERA_SIGNUPS_PER_IP): every submitted form counts, so an
  address cannot mint accounts, nor probe which usernames are taken, at script speed.

Usernames are hashed into the keys (case-folded, as log-in treats them), so the cache
never holds what someone typed.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest

from tessera.errors import DomainError

KEY_PREFIX = "tessera:auth"


@dataclass(frozen=True)
class Window:
    key: str
    limit: int
    ends_at: float  # epoch seconds

    @property
    def retry_after(self) -> int:
        return max(1, int(self.ends_at - time.time()) + 1)


def client_ip(request: HttpRequest) -> str:
    """The peer's address. Tessera is served directly (no proxy rewrites REMOTE_ADDR), so
    a client cannot choose it, unlike an X-Forwarded-For header."""
    return request.META.get("REMOTE_ADDR") or "unknown"


def _window(kind: str, ident: str, limit: int) -> Window:
    length = settings.TESSERA_AUTH_THROTTLE_WINDOW_SECONDS
    start = int(time.time()) // length * length
    digest = hashlib.sha256(ident.encode()).hexdigest()[:32]
    return Window(key=f"{KEY_PREFIX}:{kind}:{digest}:{start}", limit=limit, ends_at=start + length)


def _spent(window: Window) -> bool:
    return (cache.get(window.key) or 0) >= window.limit


def _count(window: Window) -> None:
    timeout = max(1, int(window.ends_at - time.time()) + 1)
    if not cache.add(window.key, 1, timeout):
        try:
            cache.incr(window.key)
        except ValueError:  # expired between add and incr: this attempt opens a new count
            cache.add(window.key, 1, timeout)


def _login_windows(*, ip: str, username: str) -> list[Window]:
    return [
        _window("login-ip", ip, settings.TESSERA_LOGIN_FAILURES_PER_IP),
        _window(
            "login-user", username.strip().casefold(), settings.TESSERA_LOGIN_FAILURES_PER_USERNAME
        ),
    ]


def login_refusal(*, ip: str, username: str) -> DomainError | None:
    """The refusal for a log-in attempt from ``ip`` for ``username``, or None to go on."""
    spent = [window for window in _login_windows(ip=ip, username=username) if _spent(window)]
    if not spent:
        return None
    retry_after = max(window.retry_after for window in spent)
    return DomainError(
        "login_throttled",
        "Too many failed log-ins; try again in "
        f"{_minutes(retry_after)}. If you forgot your password, ask a maintainer.",
        kind="rate_limited",
        details={"retry_after": retry_after},
        retry_after=retry_after,
    )


def login_failed(*, ip: str, username: str) -> None:
    for window in _login_windows(ip=ip, username=username):
        _count(window)


def login_succeeded(*, username: str) -> None:
    """The account's owner got in: their earlier typos no longer count against it."""
    cache.delete(_login_windows(ip="", username=username)[1].key)


def signup_refusal(*, ip: str) -> DomainError | None:
    """Count a submitted sign-up from ``ip``; the refusal when the address is over its limit
    (the refused attempt is not counted, so waiting out the window always works)."""
    window = _window("signup-ip", ip, settings.TESSERA_SIGNUPS_PER_IP)
    if _spent(window):
        return DomainError(
            "signup_throttled",
            f"Too many sign-ups from your network; try again in {_minutes(window.retry_after)}.",
            kind="rate_limited",
            details={"retry_after": window.retry_after},
            retry_after=window.retry_after,
        )
    _count(window)
    return None


def _minutes(seconds: int) -> str:
    minutes = -(-seconds // 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"
