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


def test_the_server_a_process_started_ends_when_that_process_is_killed(tmp_path, monkeypatch):
    """runtime.prefect_api's server outlives no SIGKILL of the process that started it (no orphan servers), and
    the commit lock that process held is free for the next server of the same database (the re-run)."""
    import os
    import subprocess
    import sys
    import textwrap
    import time
    import urllib.request
    from pathlib import Path

    import psutil

    root = Path(__file__).resolve().parents[2]
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from flows.runtime import commit_lock, prefect_api
        with prefect_api(Path({str(tmp_path / "logs")!r}), Path({str(tmp_path / "home")!r})) as url:
            with commit_lock({str(tmp_path / "lancedb")!r}):
                print(url, flush=True)
                time.sleep(600)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=root, env={**env, "PYTHONPATH": str(root)},
                              stdout=subprocess.PIPE, text=True)
    try:
        url = parent.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), f"no server: {parent.poll()}"
        server = psutil.Process(parent.pid).children()
        assert len(server) == 1
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 60  # the server's own SIGTERM stop, at worst its 20 s deadline, under load
        while server[0].is_running() and server[0].status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the server outlived the process that started it"
            time.sleep(0.5)
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            raise AssertionError("the killed process's server still answers")
        except OSError:
            pass
    finally:
        if parent.poll() is None:
            parent.kill()
    from prefect.client.orchestration import get_client

    from flows.runtime import prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # another test's server: this one starts its own
    with prefect_api(tmp_path / "logs", tmp_path / "home"), get_client(sync_client=True) as client:
        held = {lim.name: lim.active_slots for lim in client.read_global_concurrency_limits(limit=50)}
    assert any(name.startswith("commit-") for name in held) and not any(held.values()), held
