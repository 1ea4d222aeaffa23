"""Common Crawl access: crawl listing, WARC and index paths, resumable streams and coalesced byte-range reads."""

from __future__ import annotations

import functools
import gzip
import io
import json
import logging
import random
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import LocationValueError, MaxRetryError, ResponseError, SSLError

log = logging.getLogger("danqing.cc")

# Reasons of a record that read_records could not return; the error string is "<reason>: <detail>".
PAST_END = "cc.past_end"  # the range ends past the end of the file (an index row that does not fit the file)
TRUNCATED = "cc.truncated"  # the server kept sending fewer bytes than asked, or the connection kept dropping
UNREADABLE = "cc.unreadable"  # the file cannot be read at all (404, 403, a broken Content-Range)
BAD_RANGE = "cc.bad_range"  # a negative offset or a length < 1

# Statuses worth asking again: CloudFront and S3 answer 503 "Slow Down" under load (status.commoncrawl.org).
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


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


@dataclass
class RangeStats:
    """Counters of read_records; one instance can be passed to several calls to sum them."""

    records: int = 0  # ranges asked for
    errors: int = 0  # ranges returned with an error
    requests: int = 0  # requests sent, re-requests included
    retries: int = 0  # re-requests after a short or failed response
    bytes_selected: int = 0  # sum of the valid ranges' lengths
    bytes_read: int = 0  # body bytes received: gaps between joined ranges and discarded prefixes included


# ---- paths and listings -------------------------------------------------------------------------------------------


def resolve(url: str, cfg: CCConfig = CCConfig()) -> str:
    """The URL to read: s3://commoncrawl/<key> becomes <data_base>/<key> when s3_via_https is set."""
    if url.startswith("s3://commoncrawl/") and cfg.s3_via_https:
        return f"{cfg.data_base.rstrip('/')}/{url[len('s3://commoncrawl/'):]}"
    return url


def list_crawls(cfg: CCConfig = CCConfig()) -> list[dict]:
    """Common Crawl's crawls from collinfo.json, newest first, each with at least `id` and `name`."""
    url = f"{cfg.index_base.rstrip('/')}/collinfo.json"
    crawls = json.loads(fetch_bytes(url, cfg))
    if not isinstance(crawls, list) or not all(isinstance(c, dict) and "id" in c for c in crawls):
        raise ValueError(f"{url}: expected a JSON list of crawls with an 'id' each")
    return crawls


def check_snapshot(snapshot: str, cfg: CCConfig = CCConfig()) -> None:
    """Raise a ValueError naming the newest crawls when `snapshot` is not one of them: before any work starts."""
    ids = [c["id"] for c in list_crawls(cfg)]
    if snapshot not in ids:
        newest = ", ".join(ids[:5]) or "none"
        raise ValueError(f"unknown Common Crawl snapshot {snapshot!r}; the newest known are: {newest} "
                         f"({len(ids)} listed at {cfg.index_base})")


def warc_paths(snapshot: str, cfg: CCConfig = CCConfig()) -> list[str]:
    """Full URLs of the snapshot's WARC files, in the order of its warc.paths.gz."""
    return _listing(snapshot, "warc.paths.gz", cfg)


def index_paths(snapshot: str, cfg: CCConfig = CCConfig()) -> list[str]:
    """Full URLs of the snapshot's columnar index files of subset=warc (the successful captures)."""
    return [p for p in _listing(snapshot, "cc-index-table.paths.gz", cfg) if "/subset=warc/" in p]


def _listing(snapshot: str, name: str, cfg: CCConfig) -> list[str]:
    url = f"{cfg.data_base.rstrip('/')}/crawl-data/{snapshot}/{name}"
    try:
        text = gzip.decompress(fetch_bytes(url, cfg)).decode("utf-8")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{url} does not exist: is {snapshot!r} a crawl with this listing?") from err
    except (gzip.BadGzipFile, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{url}: not a gzip text listing: {err}") from err
    return [f"{cfg.data_base.rstrip('/')}/{line.strip()}" for line in text.splitlines() if line.strip()]


def pick(paths: list[str], limit: int | None = None, offset: int = 0, explicit: Iterable[str] | None = None,
         ) -> list[str]:
    """The WARCs to process: `explicit` ones (URLs, crawl-data/... paths or file names, each in `paths`), or
    `limit` of them after skipping `offset`. A name that is not in the listing is a ValueError, not a silent skip.
    """
    if limit is not None and limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0, got {limit}, {offset}")
    if explicit is not None:
        explicit = list(explicit)
        if limit is not None or offset:
            raise ValueError("give either explicit WARC paths or a limit/offset, not both")
        return _match_explicit(paths, explicit)
    if offset and offset >= len(paths):
        raise ValueError(f"offset {offset} is past the end of the listing ({len(paths)} WARC files)")
    return paths[offset:] if limit is None else paths[offset:offset + limit]


def _match_explicit(paths: list[str], explicit: list[str]) -> list[str]:
    chosen, missing = [], []
    for name in explicit:
        key = name[name.index("crawl-data/"):] if "crawl-data/" in name else name.strip("/")
        hits = [p for p in paths if p == name or p.endswith("/" + key)]
        if len(hits) > 1:
            raise ValueError(f"WARC name {name!r} matches {len(hits)} files of the listing; give its full path")
        if not hits:
            missing.append(name)
        elif hits[0] not in chosen:
            chosen.append(hits[0])
    if missing:
        example = paths[0] if paths else "(the listing is empty)"
        raise ValueError(f"{len(missing)} WARC file(s) not in the crawl's listing: {', '.join(missing[:5])}; "
                         f"a listed one looks like {example}")
    return chosen


# ---- HTTP -------------------------------------------------------------------------------------------------------


class _Retryable(Exception):
    """A failure worth another attempt: a transient status, a short body."""


@functools.lru_cache(maxsize=8)
def _pool(cfg: CCConfig) -> urllib3.PoolManager:
    """One connection pool per config and process, so consecutive requests to a host reuse their connection."""
    return urllib3.PoolManager(
        num_pools=8,
        maxsize=8,
        headers={"User-Agent": cfg.user_agent},
        timeout=urllib3.Timeout(connect=cfg.connect_timeout_s, read=cfg.read_timeout_s),
        # urllib3 retries nothing (our loops do, with backoff and resume); it only follows redirects.
        retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=cfg.max_redirects),
    )


def _backoff(attempt: int, cfg: CCConfig) -> float:
    """Exponential backoff with equal jitter: at least half the step, so retries never bunch up at zero."""
    step = min(cfg.backoff_max_s, cfg.backoff_s * 2 ** attempt)
    return step / 2 + random.uniform(0, step / 2)


def _transient(err: BaseException) -> bool:
    if isinstance(err, MaxRetryError):  # urllib3 wraps connect failures and read timeouts before the headers
        err = err.reason
    if isinstance(err, (SSLError, LocationValueError, ResponseError)):  # bad certificate, URL or redirects
        return False
    return isinstance(err, (_Retryable, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def _request(url: str, cfg: CCConfig, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
    """A GET with its body not yet read; a transient status raises _Retryable, a permanent one OSError."""
    resp = _pool(cfg).request("GET", url, headers=headers, preload_content=False, decode_content=False)
    if resp.status in (200, 206, 416):
        return resp
    resp.drain_conn()
    resp.release_conn()
    if resp.status in _TRANSIENT_STATUS:
        raise _Retryable(f"HTTP {resp.status}")
    if resp.status in (404, 410):
        raise FileNotFoundError(f"{url}: HTTP {resp.status}")
    raise OSError(f"{url}: HTTP {resp.status}")


def _content_range(resp: urllib3.BaseHTTPResponse) -> tuple[int | None, int | None, int | None]:
    """(first, last, total) of a Content-Range header; None where it says '*' or is absent."""
    m = _CONTENT_RANGE.fullmatch((resp.headers.get("Content-Range") or "").strip())
    if m is None:
        return None, None, None
    first, last, total = m.groups()
    return (int(first) if first else None, int(last) if last else None, int(total) if total != "*" else None)


def _length(resp: urllib3.BaseHTTPResponse) -> int | None:
    value = resp.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def fetch_bytes(url: str, cfg: CCConfig = CCConfig()) -> bytes:
    """A whole (small) remote file, with the stream's retries and resume."""
    with open_stream(url, cfg) as fh:
        return fh.read()


class ResumableReader(io.RawIOBase):
    """An HTTP body as a raw stream that survives dropped connections.

    When a read fails (connection reset, short body, timeout), it reconnects with `Range: bytes=<pos>-` and goes
    on from where it was: a 1 GB WARC is resumed, not restarted. The answer must be 206 starting at `pos`; a
    server that ignores Range (200) is read again from 0 and the first `pos` bytes are discarded. `retries` failed
    attempts in a row (no byte gained) end in an OSError naming the URL and the byte offset.
    """

    def __init__(self, url: str, cfg: CCConfig = CCConfig(), start: int = 0):
        super().__init__()
        self.url = url
        self.cfg = cfg
        self.size: int | None = None  # the file's length, once a response told it
        self.resumes = 0  # reconnections after the first request
        self._pos = start
        self._resp: urllib3.BaseHTTPResponse | None = None

    def readable(self) -> bool:
        return True

    def tell(self) -> int:  # FastWARC asks its stream for the position; a BufferedReader asks its raw stream
        return self._pos

    def readinto(self, buffer) -> int:
        if self.closed:
            raise ValueError("read from a closed ResumableReader")
        if len(buffer) == 0 or (self.size is not None and self._pos >= self.size):
            return 0
        failures = 0
        while True:
            try:
                if self._resp is None:
                    self._resp = self._connect()
                data = self._resp.read(len(buffer))
                if not data and self.size is not None and self._pos < self.size:
                    raise _Retryable("connection closed early")
                buffer[:len(data)] = data
                self._pos += len(data)
                return len(data)
            except Exception as err:
                self._drop()
                if not _transient(err):
                    raise
                if failures >= self.cfg.retries:
                    raise OSError(f"{self.url}: gave up at byte {self._pos} after {failures + 1} failed attempts: "
                                  f"{err}") from err
                time.sleep(_backoff(failures, self.cfg))
                failures += 1
                self.resumes += 1
                log.info("%s: resuming at byte %d after %s", self.url, self._pos, err)

    def _connect(self) -> urllib3.BaseHTTPResponse:
        resp = _request(self.url, self.cfg, {"Range": f"bytes={self._pos}-"} if self._pos else {})
        if resp.status == 206:
            first, _, total = _content_range(resp)
            if first != self._pos:
                resp.close()
                raise OSError(f"{self.url}: asked for bytes from {self._pos}, the server sent from {first}")
            self.size = total if total is not None else self.size
        elif resp.status == 200:
            length = _length(resp)
            self.size = length if length is not None else self.size
            if self._pos:
                log.warning("%s ignores Range: reading %d bytes again to resume", self.url, self._pos)
                _discard(resp, self._pos, self.cfg.chunk_bytes)
        else:  # 416: we never ask past a known end, so the file shrank or the start was past it
            resp.close()
            raise OSError(f"{self.url}: byte {self._pos} is past the end of the file (HTTP 416)")
        return resp

    def _drop(self) -> None:
        if self._resp is not None:
            self._resp.close()  # not drain_conn: the rest of a 1 GB body is not worth reading to reuse a socket
            self._resp = None

    def close(self) -> None:
        self._drop()
        super().close()


def _discard(resp: urllib3.BaseHTTPResponse, n: int, chunk: int) -> None:
    while n > 0:
        data = resp.read(min(chunk, n))
        if not data:
            raise _Retryable("connection closed while skipping to the resume point")
        n -= len(data)


class _Positioned(io.RawIOBase):
    """A pyarrow input stream as a raw stream that knows its position (FastWARC asks; pyarrow streams cannot)."""

    def __init__(self, stream, start: int = 0):
        super().__init__()
        self._stream = stream
        self._pos = start

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        n = self._stream.readinto(buffer)
        self._pos += n
        return n

    def close(self) -> None:
        self._stream.close()
        super().close()


@functools.lru_cache(maxsize=4)
def s3_filesystem(cfg: CCConfig):
    """pyarrow's S3 client for s3:// URLs (when s3_via_https is off), one per config and process."""
    from pyarrow import fs

    return fs.S3FileSystem(anonymous=cfg.s3_anonymous, region=cfg.s3_region,
                           connect_timeout=cfg.connect_timeout_s, request_timeout=cfg.read_timeout_s,
                           retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=cfg.retries + 1))


def open_stream(url: str, cfg: CCConfig = CCConfig(), start: int = 0) -> io.BufferedReader:
    """A buffered, sequential stream of a WARC or listing: http(s) (resumable), s3:// or a local path.

    Over S3 (s3_via_https off), pyarrow's AWS client retries requests but a dropped stream is not resumed.
    """
    url = resolve(url, cfg)
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        return io.BufferedReader(ResumableReader(url, cfg, start), buffer_size=cfg.chunk_bytes)
    if scheme == "s3":
        raw = s3_filesystem(cfg).open_input_file(url[len("s3://"):])
        raw.seek(start)
        return io.BufferedReader(_Positioned(raw, start), buffer_size=cfg.chunk_bytes)
    if "://" in url:
        raise ValueError(f"unsupported URL scheme: {url}")
    fh = open(url, "rb")
    fh.seek(start)
    return fh


# ---- byte ranges ------------------------------------------------------------------------------------------------


@dataclass
class Group:
    """Ranges read with one request: the span [start, end) and its (offset, length) members, ascending."""

    start: int
    end: int
    members: list[tuple[int, int]] = field(default_factory=list)
    wanted: int = 0  # sum of the members' lengths


def coalesce(ranges: Iterable[tuple[int, int]], cfg: CCConfig = CCConfig(), max_gap: int | None = None,
             ) -> list[Group]:
    """Sorted ranges joined into requests: a neighbour joins while the gap is at most max_gap, the gap bytes of the
    request stay within max_overread of its wanted bytes, and the request stays within max_span_bytes.
    """
    gap_limit = cfg.max_gap_bytes if max_gap is None else max_gap
    groups: list[Group] = []
    for offset, length in sorted(ranges):
        end = offset + length
        last = groups[-1] if groups else None
        if last is not None:
            new_end = max(last.end, end)
            overread = (new_end - last.start) - (last.wanted + length)
            if (offset - last.end <= gap_limit and new_end - last.start <= cfg.max_span_bytes
                    and overread <= cfg.max_overread * (last.wanted + length)):
                last.end = new_end
                last.members.append((offset, length))
                last.wanted += length
                continue
        groups.append(Group(offset, end, [(offset, length)], length))
    return groups


def read_records(url: str, ranges: Iterable[tuple[int, int]], cfg: CCConfig = CCConfig(),
                 stats: RangeStats | None = None, max_gap: int | None = None,
                 ) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(offset, bytes, None) for each (offset, length) range of one file, or (offset, None, "<reason>: detail").

    Ranges are joined into few requests (see coalesce) and yielded in offset order, invalid ones first. A bad
    range or a bad response is an error for the records it touches, never an exception: a short 206 has its
    remainder asked for again (up to `retries` times), a 416 or a response that ends at the end of the file makes
    the records past it PAST_END. A server that ignores Range (200) is read once from the start, skipping forward
    from group to group, so bytes_read then counts the skipped bytes too.
    """
    stats = RangeStats() if stats is None else stats
    valid = []
    for offset, length in ranges:
        stats.records += 1
        if offset < 0 or length < 1:
            stats.errors += 1
            yield offset, None, f"{BAD_RANGE}: offset {offset}, length {length}"
        else:
            valid.append((offset, length))
            stats.bytes_selected += length
    spans = _spans(resolve(url, cfg), cfg, stats)
    try:
        for group in coalesce(valid, cfg, max_gap):
            data, size, error = spans.fetch(group.start, group.end)
            for offset, length in group.members:
                rel = offset - group.start
                if rel + length <= len(data):
                    yield offset, data[rel:rel + length], None
                    continue
                stats.errors += 1
                if size is not None and offset + length > size:
                    yield offset, None, f"{PAST_END}: bytes {offset}-{offset + length - 1} of a {size}-byte file"
                else:
                    yield offset, None, error or f"{TRUNCATED}: bytes {offset}-{offset + length - 1} not received"
    finally:
        spans.close()


def _spans(url: str, cfg: CCConfig, stats: RangeStats):
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        return _HttpSpans(url, cfg, stats)
    if scheme == "s3":
        return _FileSpans(url, lambda: s3_filesystem(cfg).open_input_file(url[len("s3://"):]), stats)
    if "://" in url:
        raise ValueError(f"unsupported URL scheme: {url}")
    from pyarrow import fs

    return _FileSpans(url, lambda: fs.LocalFileSystem().open_input_file(url), stats)


class _FileSpans:
    """Spans of a local file or an S3 object through pyarrow (its AWS client retries S3 requests itself)."""

    def __init__(self, url: str, opener, stats: RangeStats):
        self.url, self._opener, self.stats, self._file = url, opener, stats, None

    def fetch(self, start: int, end: int) -> tuple[bytes, int | None, str | None]:
        try:
            if self._file is None:
                self._file = self._opener()
            size = self._file.size()
            self.stats.requests += 1
            data = self._file.read_at(max(0, min(end, size) - start), start) if start < size else b""
        except OSError as err:
            return b"", None, f"{UNREADABLE}: {self.url}: {err}"
        self.stats.bytes_read += len(data)
        return bytes(data), size, None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _HttpSpans:
    """Spans of one HTTP file in ascending order, one Range request each (more when a response comes up short)."""

    def __init__(self, url: str, cfg: CCConfig, stats: RangeStats):
        self.url, self.cfg, self.stats = url, cfg, stats
        self._whole: urllib3.BaseHTTPResponse | None = None  # the 200 body of a server that ignores Range
        self._whole_pos = 0
        self._whole_size: int | None = None
        self._broken: str | None = None  # a permanent failure (404, 403): later spans are not asked for

    def fetch(self, start: int, end: int) -> tuple[bytes, int | None, str | None]:
        """The bytes from `start` (fewer than asked when the file ends or the server fails), the file size when
        known, and an error when the bytes are short for another reason than the end of the file."""
        if self._broken is not None:
            return b"", None, self._broken
        buf = bytearray()
        size = None
        failures = 0
        while True:
            got, told, why, permanent = self._once(start + len(buf), end)
            buf += got
            size = told if told is not None else size
            done = start + len(buf)
            if done >= end or (size is not None and done >= size):
                return bytes(buf), size, None
            if permanent:
                self._broken = f"{UNREADABLE}: {why}"
                return bytes(buf), size, self._broken
            if failures >= self.cfg.retries:
                return bytes(buf), size, (f"{TRUNCATED}: bytes {done}-{end - 1} still missing after "
                                          f"{failures + 1} requests ({why})")
            time.sleep(_backoff(failures, self.cfg))
            failures += 1
            self.stats.retries += 1

    def _once(self, start: int, end: int) -> tuple[bytes, int | None, str, bool]:
        """One attempt: (bytes from start, file size if told, why it is short, whether asking again is useless)."""
        if self._whole is not None and self._whole_pos <= start:
            return self._from_whole(start, end)
        self._close_whole()
        self.stats.requests += 1
        try:
            resp = _request(self.url, self.cfg, {"Range": f"bytes={start}-{end - 1}"})
        except Exception as err:
            if not _transient(err):
                return b"", None, str(err), True
            return b"", None, f"{type(err).__name__}: {err}", False
        if resp.status == 416:
            _, _, total = _content_range(resp)
            resp.drain_conn()
            resp.release_conn()
            # Without a size the 416 still says the range starts at or past the end.
            return b"", total if total is not None else start, "HTTP 416", False
        if resp.status == 200:
            self._whole, self._whole_pos, self._whole_size = resp, 0, _length(resp)
            log.warning("%s ignores Range requests: reading it from the start", self.url)
            return self._from_whole(start, end)
        first, last, total = _content_range(resp)
        if first != start or last is None:
            resp.close()
            return b"", None, (f"{self.url}: asked for bytes {start}-{end - 1}, got Content-Range "
                               f"{resp.headers.get('Content-Range')!r}"), True
        want = min(end, last + 1) - start
        data, _, why = self._read(resp, want)
        if why is None and _length(resp) == len(data):  # all of the body read: the connection can be reused
            resp.release_conn()
        else:
            resp.close()
        if not why and start + len(data) < end and not (total is not None and last + 1 >= total):
            why = f"the server sent bytes {first}-{last} of {start}-{end - 1}"
        return data, total, why or "", False

    def _from_whole(self, start: int, end: int) -> tuple[bytes, int | None, str, bool]:
        _, skipped, why = self._read(self._whole, start - self._whole_pos, keep=False)
        self._whole_pos += skipped
        data = b""
        if why is None and self._whole_pos == start:
            data, got, why = self._read(self._whole, end - start)
            self._whole_pos += got
        if why is not None:
            self._close_whole()
            return data, None, why, False
        if self._whole_pos < end and self._whole_size is None:
            return data, self._whole_pos, "", False  # no Content-Length: where the body ended is the size
        return data, self._whole_size, "", False

    def _read(self, resp: urllib3.BaseHTTPResponse, n: int, keep: bool = True) -> tuple[bytes, int, str | None]:
        """Up to n body bytes (b"" when not kept), how many came, and why fewer came; counted in bytes_read."""
        out = bytearray()
        count = 0
        try:
            while count < n:
                chunk = resp.read(min(self.cfg.chunk_bytes, n - count))
                if not chunk:
                    break
                count += len(chunk)
                self.stats.bytes_read += len(chunk)
                if keep:
                    out += chunk
        except Exception as err:
            if not _transient(err):
                raise
            return bytes(out), count, f"{type(err).__name__}: {err}"
        return bytes(out), count, None

    def _close_whole(self) -> None:
        if self._whole is not None:
            self._whole.close()
            self._whole = None

    def close(self) -> None:
        self._close_whole()


class RangeFile(io.RawIOBase):
    """A remote file as a seekable raw file of Range requests, for readers that jump around (parquet footers)."""

    def __init__(self, url: str, cfg: CCConfig = CCConfig()):
        super().__init__()
        self.url = resolve(url, cfg)
        self.stats = RangeStats()
        self._spans = _spans(self.url, cfg, self.stats)
        self._pos = 0
        _, size, error = self._spans.fetch(0, 1)
        if size is None:
            raise OSError(error or f"{self.url}: the server did not tell the file's size")
        self.size = size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        end = min(self.size, self._pos + len(buffer))
        if end <= self._pos:
            return 0
        data, _, error = self._spans.fetch(self._pos, end)
        if len(data) < end - self._pos:
            raise OSError(f"{self.url}: reading bytes {self._pos}-{end - 1}: {error or 'short read'}")
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._spans.close()
        super().close()

