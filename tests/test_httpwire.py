"""The shared HTTP plumbing: status mapping, Retry-After (both forms), Content-Range checks."""

from __future__ import annotations

import email.utils

import pytest

from mastfs.auth import LOGIN_HINT, REFUSED_HINT
from mastfs.errors import BadResponse, NotFound, Retryable, Unauthorized
from mastfs.httpwire import check_content_range, error_for_status, parse_retry_after


@pytest.mark.parametrize(("status", "kind"), [
    (401, Unauthorized), (403, Unauthorized), (404, NotFound), (416, BadResponse),
    (408, Retryable), (425, Retryable), (429, Retryable), (500, Retryable), (502, Retryable),
    (503, Retryable), (504, Retryable), (400, BadResponse), (405, BadResponse), (410, BadResponse),
    (302, BadResponse),
])
def test_each_status_maps_to_one_domain_error(status, kind):
    error = error_for_status(status, "GET x", has_token=False, retry_after=3.0)
    assert type(error) is kind
    assert str(error).startswith("GET x: ")
    if kind is Retryable:
        assert error.retry_after == 3.0


def test_refused_requests_say_how_to_log_in_or_renew():
    anonymous = error_for_status(401, "x", has_token=False)
    refused = error_for_status(403, "x", has_token=True)
    assert anonymous.reason == LOGIN_HINT and "MAST_API_TOKEN" in LOGIN_HINT
    assert refused.reason == REFUSED_HINT and "get a new one" in REFUSED_HINT


def test_retry_after_delta_seconds():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("-5") == 0.0


def test_retry_after_http_date_is_relative_to_now():
    now = 1_700_000_000.0
    header = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(header, now=now) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "Mon, 99 Foo 2024 99:99:99 GMT"])
def test_retry_after_nonsense_is_none(value):
    assert parse_retry_after(value) is None


def test_content_range_must_name_exactly_the_request():
    check_content_range("r", 100, 200, "bytes 100-199/5000", "100")
    check_content_range("r", 100, 200, "bytes 100-199/*")
    for header in ["bytes 101-199/5000", "bytes 100-200/5000", "", None, "items 100-199/5000"]:
        with pytest.raises(Retryable):
            check_content_range("r", 100, 200, header)
    with pytest.raises(Retryable):
        check_content_range("r", 100, 200, "bytes 100-199/5000", "99")
