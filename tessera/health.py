"""Health checks of the web process, for load balancers and container health checks.

``/healthz`` says the process answers (liveness); ``/readyz`` says it can serve: the
database and the cache answer. Both are exempt from the HTTPS redirect, so a probe over
plain HTTP inside the deployment gets the real answer rather than a 301."""

from __future__ import annotations

import logging

from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

logger = logging.getLogger(__name__)


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception:  # any failure means not ready; the reason goes to the log only
        logger.warning("readiness: the database does not answer", exc_info=True)
        checks["database"] = "unavailable"
    try:
        cache.get("tessera:readyz")
        checks["cache"] = "ok"
    except Exception:
        logger.warning("readiness: the cache does not answer", exc_info=True)
        checks["cache"] = "unavailable"
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", **checks}, status=200 if ready else 503
    )
