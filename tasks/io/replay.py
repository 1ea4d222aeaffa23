"""WARC replay fetcher: image bytes and HTTP headers served from WARC response records by URL."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import pandas as pd

from tasks.io.http import HTTP_ERROR, TOO_LARGE, FetchResult
from tasks.io.polite import (
    BLOCKED_ADDRESS,
    OPT_OUT,
    ROBOTS,
    AddressGuard,
    Robots,
    is_ip_literal,
    opted_out,
    robots_url,
)
from tasks.io.warc import read_record_at


@dataclass(frozen=True)
class ReplayConfig:
    max_bytes: int = 20_000_000  # same cap as the HTTP fetcher: replay behaves like the web
    block_private: bool = True  # the SSRF guard on literal addresses (replay resolves no host names)
    allow_networks: tuple[str, ...] = ()  # CIDRs the guard lets through
    robots: bool = True  # honour the robots.txt records the WARCs hold for a host
    opt_out: bool = True  # honour X-Robots-Tag noai / noimageai / noindex / noimageindex on the record
    robots_agent: str = "danqing"  # the product token robots.txt groups and X-Robots-Tag scopes are matched to


class ReplayFetcher:
    """Answers URLs from an index of response records; a URL it does not hold is like a 404.

    It applies the same policy as the web fetcher: the address guard, robots.txt (when the WARCs hold
    one for the host; none held allows all, like a 404) and opt-out headers.
    """

    def __init__(self, index: pd.DataFrame, config: ReplayConfig = ReplayConfig()):
        # first capture of a URL wins: the index is sorted by file and offset upstream
        first = index.drop_duplicates("url", keep="first")
        self._where = dict(zip(first["url"], zip(first["warc_file"], first["offset"], strict=True), strict=True))
        self.config = config
        self._guard = AddressGuard(config.block_private, config.allow_networks)
        self._robots: dict[str, Robots | None] = {}

    def fetch_many(self, urls: list[str]) -> list[FetchResult]:
        return [self._fetch(u) for u in urls]

    def _fetch(self, url: str) -> FetchResult:
        refused = self._refuse(url)
        if refused is not None:
            return FetchResult(url, False, refused[0], None, None, {}, refused[1], attempts=0)
        where = self._where.get(url)
        if where is None:
            return FetchResult(url, False, HTTP_ERROR, None, None, {}, "not in the replayed WARC files")
        rec, body = read_record_at(where[0], int(where[1]))
        if rec.status is None or not 200 <= rec.status < 300:  # first, as the web fetcher does
            return FetchResult(url, False, HTTP_ERROR, rec.status, None, rec.headers, f"HTTP {rec.status}")
        directive = opted_out(rec.headers, self.config.robots_agent) if self.config.opt_out else None
        if directive is not None:
            return FetchResult(url, False, OPT_OUT, rec.status, None, rec.headers, f"X-Robots-Tag: {directive}")
        if len(body) > self.config.max_bytes:
            return FetchResult(url, False, TOO_LARGE, rec.status, None, rec.headers,
                               f"exceeded {self.config.max_bytes} bytes")
        return FetchResult(url, True, None, rec.status, body, rec.headers, None)

    def _refuse(self, url: str) -> tuple[str, str] | None:
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError:
            return None
        if not host:
            return None
        if is_ip_literal(host):
            why = self._guard.why_blocked(host)
            if why is not None:
                return BLOCKED_ADDRESS, why
        if self.config.robots:
            robots = self._robots_for(robots_url(parts.scheme, host, port))
            if robots is not None and not robots.allows(self.config.robots_agent, url):
                return ROBOTS, f"robots.txt of {host} disallows this path for {self.config.robots_agent}"
        return None

    def _robots_for(self, where: str) -> Robots | None:
        if where not in self._robots:
            found = self._where.get(where)
            if found is None:
                self._robots[where] = None
            else:
                rec, body = read_record_at(found[0], int(found[1]))
                self._robots[where] = Robots(rec.status, body)
        return self._robots[where]


def merge_indexes(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """One replay index over the run's WARC files: every response record by URL, the first capture winning."""
    index = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["url", "warc_file", "offset", "status"])
    return index.drop_duplicates("url", keep="first")

