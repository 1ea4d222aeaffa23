"""The one retry policy: which failures are transient, how long to wait before the next attempt, Retry-After."""

from __future__ import annotations

import email.utils
import math
import random
import time

# A dropped or refused connection, or a time-out: the failures a later attempt may not meet. Each client adds the
# classes its library wraps these in (tasks/io/cchttp.py for urllib3, tasks/io/http.py for aiohttp).
TRANSIENT_ERRORS = (ConnectionError, TimeoutError)

# Statuses worth asking again: time-outs (408, 504), too early (425), too many requests (429) and the errors of a
# busy server or gateway (500, 502, 503: CloudFront and S3 answer 503 "Slow Down" under load, per
# status.commoncrawl.org). 501 (not implemented) and 505 (HTTP version) will answer the same next time.
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def is_transient_error(exc: BaseException) -> bool:
    """Whether `exc` is a connection failure or a time-out (subclasses included), not a bug or bad data.

    This alone is the retry condition of the Prefect tasks; the HTTP clients extend it with their library's own
    classes and exclude the ones no retry mends (bad certificates, URLs, DNS misses).
    """
    return isinstance(exc, TRANSIENT_ERRORS)


def is_transient_status(status: int) -> bool:
    """Whether a response with this status may succeed when asked again (TRANSIENT_STATUS)."""
    return status in TRANSIENT_STATUS


def is_transient_web_status(status: int) -> bool:
    """The image fetcher's rule: 429 and every 5xx, but not 408 or 425.

    Image hosts on the open web answer many 5xx beyond TRANSIENT_STATUS (Cloudflare's 520-524, 509 for a host over
    its bandwidth), and the fetch ledger's `transient` column, which picks the URLs a --retry-failed run asks again,
    has always meant exactly this.
    """
    return status == 429 or status >= 500


def backoff_s(attempt: int, base_s: float, cap_s: float = math.inf, jitter: float = 0.5) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first).

    The step base_s * 2**attempt, capped at cap_s, of which the `jitter` share is drawn at random: 0.5 ("equal
    jitter") waits between half the step and the whole of it, so clients that failed together neither retry in
    step nor bunch up at zero.
    """
    step = min(cap_s, base_s * 2 ** attempt)
    return step * (1 - jitter) + random.uniform(0, step * jitter)


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date (RFC 9110 10.2.3); None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
