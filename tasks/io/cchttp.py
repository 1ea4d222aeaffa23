"""The HTTP client of Common Crawl reads: pooled GETs, their statuses and failures sorted into retry or give up."""

from __future__ import annotations

import functools
import re

import urllib3
from urllib3.exceptions import LocationValueError, MaxRetryError, ResponseError, SSLError

from tasks.io.ccconfig import CCConfig
from tasks.io.retry import is_transient_error, is_transient_status

_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


class Retryable(Exception):
    """A failure worth another attempt that urllib3 does not raise itself: a transient status, a short body."""


@functools.lru_cache(maxsize=8)
def _pool(cfg: CCConfig) -> urllib3.PoolManager:
    """One connection pool per config and process, so consecutive requests to a host reuse their connection."""
    return urllib3.PoolManager(
        num_pools=8,
        maxsize=8,
        headers={"User-Agent": cfg.user_agent},
        timeout=urllib3.Timeout(connect=cfg.connect_timeout_s, read=cfg.read_timeout_s),
        # urllib3 retries nothing (the readers do, with backoff and resume); it only follows redirects.
        retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=cfg.max_redirects),
    )


def is_transient(err: BaseException) -> bool:
    """The retry policy's transient errors, plus urllib3's own failures except those no retry mends."""
    if isinstance(err, MaxRetryError):  # urllib3 wraps connect failures and read timeouts before the headers
        err = err.reason
    if isinstance(err, (SSLError, LocationValueError, ResponseError)):  # bad certificate, URL or redirects
        return False
    return isinstance(err, (Retryable, urllib3.exceptions.HTTPError)) or is_transient_error(err)


def request(url: str, cfg: CCConfig, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
    """A GET with its body not yet read; a transient status raises Retryable, a permanent one OSError."""
    resp = _pool(cfg).request("GET", url, headers=headers, preload_content=False, decode_content=False)
    if resp.status in (200, 206, 416):
        return resp
    resp.drain_conn()
    resp.release_conn()
    if is_transient_status(resp.status):
        raise Retryable(f"HTTP {resp.status}")
    if resp.status in (404, 410):
        raise FileNotFoundError(f"{url}: HTTP {resp.status}")
    raise OSError(f"{url}: HTTP {resp.status}")


def content_range(resp: urllib3.BaseHTTPResponse) -> tuple[int | None, int | None, int | None]:
    """(first, last, total) of a Content-Range header; None where it says '*' or is absent."""
    m = _CONTENT_RANGE.fullmatch((resp.headers.get("Content-Range") or "").strip())
    if m is None:
        return None, None, None
    first, last, total = m.groups()
    return (int(first) if first else None, int(last) if last else None, int(total) if total != "*" else None)


def content_length(resp: urllib3.BaseHTTPResponse) -> int | None:
    value = resp.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None
