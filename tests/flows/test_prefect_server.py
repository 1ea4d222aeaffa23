"""The server danqing starts answers a SQLite write race with a short Retry-After, and nothing else changes."""

import asyncio
import sqlite3

import pytest
import sqlalchemy
from prefect.server.api.server import custom_internal_exception_handler
from starlette.requests import Request

from flows import prefect_server
from flows.prefect_server import MAX_RETRY_S, RaceBackoff, quick_retry_handler


def _request() -> Request:
    return Request({"type": "http", "method": "POST", "path": "/api/v2/concurrency_limits/increment-with-lease",
                    "headers": [], "query_string": b""})


def _db_error(orig: Exception) -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("UPDATE concurrency_limit_v2 ...", {}, orig)


def _answer(exc: Exception, backoff: RaceBackoff | None = None):
    handler = quick_retry_handler(custom_internal_exception_handler, backoff or RaceBackoff())
    return asyncio.run(handler(_request(), exc))


def test_a_locked_database_is_a_503_with_a_short_retry_after():
    response = _answer(_db_error(sqlite3.OperationalError("database is locked")))
    assert response.status_code == 503
    assert float(response.headers["Retry-After"]) == pytest.approx(prefect_server.FIRST_RETRY_S)


def test_other_errors_keep_prefects_answer_without_retry_after():
    bug = _answer(ValueError("a bug"))
    assert bug.status_code == 500 and "Retry-After" not in bug.headers
    # a SQLite error that is not a race: Prefect's own answer (not retryable), no header
    other = _answer(_db_error(sqlite3.OperationalError("no such table: flow_run")))
    assert other.status_code == 500 and "Retry-After" not in other.headers


def test_races_in_a_burst_back_off_to_the_clients_own_delay_then_reset():
    backoff = RaceBackoff()
    delays = [backoff.next(t * 0.1) for t in range(8)]
    assert delays[:3] == pytest.approx([0.1, 0.2, 0.4])
    assert delays == sorted(delays) and delays[-1] == MAX_RETRY_S
    assert backoff.next(100.0) == pytest.approx(prefect_server.FIRST_RETRY_S)  # a quiet spell starts over
