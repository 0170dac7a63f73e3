"""django.request's error lines: a deliberate 503 (load shed, not ready) is demoted to
DEBUG, so a flood of them under load does not bury the real errors; a 500 stays an error."""

from __future__ import annotations

import logging

import pytest
from django.http import HttpResponse
from django.test import RequestFactory
from django.utils.log import log_response


def logged(status: int, level: int, caplog) -> list[logging.LogRecord]:
    """django.request's records for one answer of ``status``, captured at ``level``."""
    request = RequestFactory().post("/v1/chat/completions")
    with caplog.at_level(level):
        log_response("%s", request.path, response=HttpResponse(status=status), request=request)
    return [r for r in caplog.records if r.name == "django.request"]


def test_a_503_is_not_logged_as_an_error(caplog):
    assert logged(503, logging.INFO, caplog) == []


def test_a_503_is_shown_at_debug(caplog):
    [record] = logged(503, logging.DEBUG, caplog)
    assert record.levelno == logging.DEBUG


@pytest.mark.parametrize("status", [500, 502])
def test_other_server_errors_stay_errors(caplog, status):
    [record] = logged(status, logging.INFO, caplog)
    assert record.levelno == logging.ERROR
