"""Tests for tasks.io.retry: what counts as transient, the backoff formula and Retry-After."""

from __future__ import annotations

import email.utils
import time

import pytest

from tasks.io.retry import (
    TRANSIENT_STATUS,
    backoff_s,
    is_transient_error,
    is_transient_status,
    is_transient_web_status,
    retry_after_s,
)


class _LibraryTimeout(TimeoutError):
    """Like aiohttp's ServerTimeoutError: a library's own class under TimeoutError."""


@pytest.mark.parametrize("exc", [ConnectionError(), ConnectionResetError(), ConnectionRefusedError(),
                                 BrokenPipeError(), TimeoutError(), _LibraryTimeout()])
def test_connection_failures_and_time_outs_are_transient(exc):
    assert is_transient_error(exc)


@pytest.mark.parametrize("exc", [OSError("HTTP 403"), FileNotFoundError(), ValueError(), RuntimeError(),
                                 KeyError("x"), KeyboardInterrupt()])
def test_other_failures_are_not(exc):
    # The Prefect tasks' retry condition: a bug, bad data or a missing file must not be run again.
    assert not is_transient_error(exc)


def test_statuses_of_common_crawl_and_of_the_open_web():
    assert [s for s in range(100, 600) if is_transient_status(s)] == sorted(TRANSIENT_STATUS)
    assert not any(is_transient_status(s) for s in (200, 206, 404, 410, 416, 501, 505))
    web = [s for s in range(100, 600) if is_transient_web_status(s)]
    assert web == [429, *range(500, 600)]


def test_backoff_doubles_per_attempt_up_to_the_cap_with_equal_jitter():
    assert [backoff_s(a, 1.0, jitter=0) for a in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_s(10, 1.0, cap_s=30.0, jitter=0) == 30.0
    waits = [backoff_s(2, 1.0) for _ in range(500)]
    assert all(2.0 <= w <= 4.0 for w in waits)  # half the step at least, the whole step at most
    assert max(waits) - min(waits) > 1.0  # and spread, so clients that failed together do not retry together
    assert all(0.0 <= backoff_s(2, 1.0, jitter=1) <= 4.0 for _ in range(100))


def test_retry_after_in_seconds_or_as_a_date():
    assert retry_after_s("7") == 7.0
    assert retry_after_s(" 0 ") == 0.0
    assert 58 <= retry_after_s(email.utils.formatdate(time.time() + 60, usegmt=True)) <= 60
    assert retry_after_s(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
    assert retry_after_s(None) is retry_after_s("") is retry_after_s("soon") is None
    assert retry_after_s("-5") is None
