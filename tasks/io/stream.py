"""Sequential reads of a WARC or listing: resumed over HTTP after a dropped connection, pyarrow over S3, or a file."""

from __future__ import annotations

import functools
import io
import logging
import time
from urllib.parse import urlsplit

import urllib3

from tasks.io.ccconfig import CCConfig, resolve
from tasks.io.cchttp import Retryable, content_length, content_range, is_transient, request
from tasks.io.retry import backoff_s

log = logging.getLogger("danqing.cc")


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
                    raise Retryable("connection closed early")
                buffer[:len(data)] = data
                self._pos += len(data)
                return len(data)
            except Exception as err:
                self._drop()
                if not is_transient(err):
                    raise
                if failures >= self.cfg.retries:
                    raise OSError(f"{self.url}: gave up at byte {self._pos} after {failures + 1} failed attempts: "
                                  f"{err}") from err
                time.sleep(backoff_s(failures, self.cfg.backoff_s, self.cfg.backoff_max_s))
                failures += 1
                self.resumes += 1
                log.info("%s: resuming at byte %d after %s", self.url, self._pos, err)

    def _connect(self) -> urllib3.BaseHTTPResponse:
        resp = request(self.url, self.cfg, {"Range": f"bytes={self._pos}-"} if self._pos else {})
        if resp.status == 206:
            first, _, total = content_range(resp)
            if first != self._pos:
                resp.close()
                raise OSError(f"{self.url}: asked for bytes from {self._pos}, the server sent from {first}")
            self.size = total if total is not None else self.size
        elif resp.status == 200:
            length = content_length(resp)
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
            raise Retryable("connection closed while skipping to the resume point")
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

