"""Byte ranges of one file (WARC records, parquet footers): joined into few requests, each failure a reason."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import urllib3

from tasks.io.ccconfig import CCConfig, resolve
from tasks.io.cchttp import content_length, content_range, is_transient, request
from tasks.io.retry import backoff_s
from tasks.io.stream import s3_filesystem

log = logging.getLogger("danqing.cc")

# Reasons of a record that read_records could not return; the error string is "<reason>: <detail>".
PAST_END = "cc.past_end"  # the range ends past the end of the file (an index row that does not fit the file)
TRUNCATED = "cc.truncated"  # the server kept sending fewer bytes than asked, or the connection kept dropping
UNREADABLE = "cc.unreadable"  # the file cannot be read at all (404, 403, a broken Content-Range)
BAD_RANGE = "cc.bad_range"  # a negative offset or a length < 1


@dataclass
class RangeStats:
    """Counters of read_records; one instance can be passed to several calls to sum them."""

    records: int = 0  # ranges asked for
    errors: int = 0  # ranges returned with an error
    requests: int = 0  # requests sent, re-requests included
    retries: int = 0  # re-requests after a short or failed response
    bytes_selected: int = 0  # sum of the valid ranges' lengths
    bytes_read: int = 0  # body bytes received: gaps between joined ranges and discarded prefixes included


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
            time.sleep(backoff_s(failures, self.cfg.backoff_s, self.cfg.backoff_max_s))
            failures += 1
            self.stats.retries += 1

    def _once(self, start: int, end: int) -> tuple[bytes, int | None, str, bool]:
        """One attempt: (bytes from start, file size if told, why it is short, whether asking again is useless)."""
        if self._whole is not None and self._whole_pos <= start:
            return self._from_whole(start, end)
        self._close_whole()
        self.stats.requests += 1
        try:
            resp = request(self.url, self.cfg, {"Range": f"bytes={start}-{end - 1}"})
        except Exception as err:
            if not is_transient(err):
                return b"", None, str(err), True
            return b"", None, f"{type(err).__name__}: {err}", False
        if resp.status == 416:
            _, _, total = content_range(resp)
            resp.drain_conn()
            resp.release_conn()
            # Without a size the 416 still says the range starts at or past the end.
            return b"", total if total is not None else start, "HTTP 416", False
        if resp.status == 200:
            self._whole, self._whole_pos, self._whole_size = resp, 0, content_length(resp)
            log.warning("%s ignores Range requests: reading it from the start", self.url)
            return self._from_whole(start, end)
        first, last, total = content_range(resp)
        if first != start or last is None:
            resp.close()
            return b"", None, (f"{self.url}: asked for bytes {start}-{end - 1}, got Content-Range "
                               f"{resp.headers.get('Content-Range')!r}"), True
        want = min(end, last + 1) - start
        data, _, why = self._read(resp, want)
        if why is None and content_length(resp) == len(data):  # all of the body read: the connection can be reused
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
            if not is_transient(err):
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
