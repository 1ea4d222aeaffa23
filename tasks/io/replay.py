"""WARC replay fetcher: image bytes and HTTP headers served from WARC response records by URL."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from tasks.io.http import HTTP_ERROR, TOO_LARGE, FetchResult
from tasks.io.warc import read_record_at


@dataclass(frozen=True)
class ReplayConfig:
    max_bytes: int = 20_000_000  # same cap as the HTTP fetcher: replay behaves like the web


class ReplayFetcher:
    """Answers URLs from an index of response records; a URL it does not hold is like a 404."""

    def __init__(self, index: pd.DataFrame, config: ReplayConfig = ReplayConfig()):
        # first capture of a URL wins: the index is sorted by file and offset upstream
        first = index.drop_duplicates("url", keep="first")
        self._where = dict(zip(first["url"], zip(first["warc_file"], first["offset"], strict=True), strict=True))
        self.config = config

    def fetch_many(self, urls: list[str]) -> list[FetchResult]:
        return [self._fetch(u) for u in urls]

    def _fetch(self, url: str) -> FetchResult:
        where = self._where.get(url)
        if where is None:
            return FetchResult(url, False, HTTP_ERROR, None, None, {}, "not in the replayed WARC files")
        rec, body = read_record_at(where[0], int(where[1]))
        if rec.status is None or not 200 <= rec.status < 300:
            return FetchResult(url, False, HTTP_ERROR, rec.status, None, rec.headers, f"HTTP {rec.status}")
        if len(body) > self.config.max_bytes:
            return FetchResult(url, False, TOO_LARGE, rec.status, None, rec.headers,
                               f"exceeded {self.config.max_bytes} bytes")
        return FetchResult(url, True, None, rec.status, body, rec.headers, None)
