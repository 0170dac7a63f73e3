"""django.request's error lines: a deliberate 503 (load shed, not ready) is demoted to
DEBUG, so a flood of them under load does not bury the real errors; a 500 stays an error."""

from __future__ import annotations

import logging

import pytest
from django.http import HttpResponse
from django.test import RequestFactory
from django.utils.log import log_response


@pytest.fixture
def request_():
    return RequestFactory().post("/v1/chat/completions")


def test_a_503_is_not_logged_as_an_error(caplog, request_):
    with caplog.at_level(logging.INFO):
        log_response(
            "Service Unavailable: %s",
            request_.path,
            response=HttpResponse(status=503),
            request=request_,
        )
    assert [r for r in caplog.records if r.name == "django.request"] == []


def test_a_503_is_shown_at_debug(caplog, request_):
    with caplog.at_level(logging.DEBUG):
        log_response(
            "Service Unavailable: %s",
            request_.path,
            response=HttpResponse(status=503),
            request=request_,
        )
    [record] = [r for r in caplog.records if r.name == "django.request"]
    assert record.levelno == logging.DEBUG


@pytest.mark.parametrize("status", [500, 502])
def test_other_server_errors_stay_errors(caplog, request_, status):
    with caplog.at_level(logging.INFO):
        log_response(
            "Server error: %s",
            request_.path,
            response=HttpResponse(status=status),
            request=request_,
        )
    [record] = [r for r in caplog.records if r.name == "django.request"]
    assert record.levelno == logging.ERROR
