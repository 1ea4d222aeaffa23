"""The settings of every Common Crawl read (CCConfig), and where an s3://commoncrawl/ key is read from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CCConfig:
    index_base: str = "https://index.commoncrawl.org"  # serves collinfo.json
    data_base: str = "https://data.commoncrawl.org"  # serves crawl-data/ and cc-index/ (the bucket over HTTPS)
    s3_via_https: bool = True  # read s3://commoncrawl/<key> as <data_base>/<key>: no AWS client needed
    s3_anonymous: bool = True  # unsigned S3 requests when s3_via_https is off
    s3_region: str = "us-east-1"  # where the commoncrawl bucket lives
    retries: int = 5  # failed attempts in a row (no byte gained) before giving up; 0 tries once
    backoff_s: float = 1.0  # first retry waits 0.5-1x this; doubles each attempt (CC asks for <= 1 retry/s)
    backoff_max_s: float = 30.0  # cap of one wait
    connect_timeout_s: float = 10.0  # getting a connected socket
    read_timeout_s: float = 60.0  # silence on an open connection before it counts as dropped
    chunk_bytes: int = 1 << 20  # one socket read, and the buffer of a streamed WARC
    max_gap_bytes: int = 8 * 1024  # read_records joins two ranges into one request when the gap is at most this
    max_overread: float = 0.2  # ... and only while a request's gap bytes stay <= this share of its wanted bytes
    max_span_bytes: int = 32 << 20  # ... and only while one request stays at most this long
    max_redirects: int = 5  # redirects followed per request
    user_agent: str = "danqing/0.1 (image-text dataset research; +https://github.com/danqing-project/danqing)"

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ValueError("retries and backoff times must be >= 0")
        if self.chunk_bytes < 1 or self.max_gap_bytes < 0 or self.max_overread < 0 or self.max_span_bytes < 1:
            raise ValueError("chunk_bytes and max_span_bytes must be >= 1, max_gap_bytes and max_overread >= 0")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")

    @classmethod
    def for_base_url(cls, url: str, **fields) -> CCConfig:
        """A config whose index and data both come from one server (a mirror, or a test server)."""
        base = url.rstrip("/")
        return cls(index_base=base, data_base=base, **fields)


def resolve(url: str, cfg: CCConfig = CCConfig()) -> str:
    """The URL to read: s3://commoncrawl/<key> becomes <data_base>/<key> when s3_via_https is set."""
    if url.startswith("s3://commoncrawl/") and cfg.s3_via_https:
        return f"{cfg.data_base.rstrip('/')}/{url[len('s3://commoncrawl/'):]}"
    return url
