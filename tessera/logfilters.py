"""Logging filters of the deployment's LOGGING setting."""

from __future__ import annotations

import logging


class DeliberateUnavailable(logging.Filter):
    """django.request logs every 5xx answer as an error. A 503 is one the servers send on
    purpose: the inference API shedding load past its queue bound or while its engine
    starts, /readyz while a dependency is down; under load that is one error line per
    refused request, burying the real ones. They are demoted to DEBUG (shown with
    TESSERA_LOG_LEVEL=DEBUG); every other status is left as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "status_code", None) != 503:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)
