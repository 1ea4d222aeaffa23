"""`prefect server start` for the servers danqing starts itself, with SQLite write races retried quickly.

Prefect's SQLite database runs in WAL mode, where a transaction that reads and then writes (acquiring a
concurrency slot does: it reads the limit, then updates it) fails at once with "database is locked" when
another connection commits in between; the busy timeout does not apply. The server answers 503 and the
client backs off 2**attempt seconds. The task-run recorder commits exactly when the next task starts, so a
`gpu`-tagged task often waited 2 s for a slot nobody held (measured: one such 1.9-2.4 s stall in about half
the runs of two tagged tasks). This entry point is Prefect's own CLI; only its 503 for a SQLite race carries
a Retry-After, short while races are rare and growing to the client's own 2 s when they come in bursts.

A server the user runs (PREFECT_API_URL, or PostgreSQL) is left as it is.
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque

import sqlalchemy

FIRST_RETRY_S = 0.1
MAX_RETRY_S = 2.0  # the client's own first back-off
WINDOW_S = 5.0  # races within this window count as one burst


class RaceBackoff:
    """Retry-After for the k-th SQLite race within WINDOW_S: FIRST_RETRY_S * 2**(k-1), at most MAX_RETRY_S."""

    def __init__(self) -> None:
        self._recent: deque[float] = deque(maxlen=64)

    def next(self, now: float) -> float:
        while self._recent and now - self._recent[0] > WINDOW_S:
            self._recent.popleft()
        self._recent.append(now)
        return min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** (len(self._recent) - 1))


def sqlite_race(exc: Exception) -> bool:
    """A SQLite busy or locked error, which the next attempt may not meet."""
    if not (isinstance(exc, sqlalchemy.exc.OperationalError) and isinstance(exc.orig, sqlite3.OperationalError)):
        return False
    orig = exc.orig
    return (getattr(orig, "sqlite_errorname", None) in {"SQLITE_BUSY", "SQLITE_BUSY_SNAPSHOT"}
            or "database is locked" in str(orig))


def quick_retry_handler(stock, backoff: RaceBackoff):
    """Prefect's handler for unexpected exceptions, plus a Retry-After on its 503 for a SQLite race."""

    async def handler(request, exc: Exception):
        response = await stock(request, exc)
        if response.status_code == 503 and sqlite_race(exc):
            response.headers["Retry-After"] = f"{backoff.next(time.monotonic()):.2f}"
        return response

    return handler


def main() -> None:
    import prefect.server.api.server as server
    from prefect.cli import app

    # create_app() reads the handler from the module when it builds the app, after this assignment
    server.custom_internal_exception_handler = quick_retry_handler(server.custom_internal_exception_handler,
                                                                   RaceBackoff())
    app()


if __name__ == "__main__":
    main()
