"""The one domain error type. Services raise it; tessera.api maps it to HTTP.

Domain code never speaks HTTP: it says what kind of failure happened (``kind``), a stable
machine-readable ``code`` and a sentence for people.
"""

from __future__ import annotations

from typing import Any, Literal

ErrorKind = Literal["invalid", "forbidden", "not_found", "conflict", "too_large", "rate_limited"]


class DomainError(Exception):
    kind: ErrorKind = "invalid"

    def __init__(
        self,
        code: str,
        message: str,
        *,
        kind: ErrorKind | None = None,
        details: dict[str, Any] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        if kind is not None:
            self.kind = kind
        self.details = details or {}
        # Whole seconds until trying again makes sense (a rate limit): sent as Retry-After.
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
