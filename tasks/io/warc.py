"""Read WARC records (FastWARC, warcio as the fallback) as small plain objects."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.io.ccconfig import CCConfig
from tasks.io.ranges import RangeStats, read_records
from tasks.io.stream import open_stream

log = logging.getLogger("danqing.warc")

try:  # FastWARC reads at ~0.9x gunzip speed, warcio at ~0.33x (STACK.md)
    from fastwarc.warc import ArchiveIterator as _FastIterator
    from fastwarc.warc import WarcRecordType as _FastType

    HAVE_FASTWARC = True
except ImportError:  # pragma: no cover - exercised through backend="warcio"
    HAVE_FASTWARC = False

BAD_MEMBER = "warc.bad_member"  # a byte range that does not inflate or parse as a WARC record
TRUNCATED_RECORD = "warc.truncated_record"  # a record whose payload ends before its Content-Length

WANTED = frozenset({"warcinfo", "response", "metadata", "resource"})
# How a WARC file can start: gzip, zstd or lz4 members (FastWARC reads all three), or plain text.
_MAGIC = (b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"\x04\x22\x4d\x18", b"WARC/")


@dataclass(slots=True)
class Record:
    """One WARC record, headers parsed, payload read only on demand."""

    type: str
    uri: str | None
    offset: int            # byte offset of the record in the (compressed) file
    _warc: object          # the WARC headers (a mapping with .get): date and ids are read from it when asked
    status: int | None     # HTTP status of a response record
    mime: str | None       # HTTP Content-Type without parameters, lower-case (a resource record: its own type)
    charset: str | None    # HTTP Content-Type charset, lower-case
    _headers: object = None  # HTTP headers: a dict, or the reader's header map, turned into a dict when asked
    _reader: object = None
    _declared: int | None = None
    truncated: bool = False
    _held: bytes | None = None  # the payload read by hold(), for the next read()

    @property
    def date(self) -> str | None:
        return self._warc.get("WARC-Date")

    @property
    def record_id(self) -> str | None:
        return self._warc.get("WARC-Record-ID")

    @property
    def concurrent_to(self) -> str | None:
        return self._warc.get("WARC-Concurrent-To")

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers with lower-case names (built on first use: most records never need them)."""
        if not isinstance(self._headers, dict):
            self._headers = {k.lower(): v for k, v in self._headers} if self._headers is not None else {}
        return self._headers

    def hold(self) -> None:
        """Keep the payload for a read() after the reader has moved past this record, and set `truncated` now.

        The reader streams: a record's payload is gone once the next record is asked for. warcio's records read
        it here; FastWARC's keep it in the reader's own memory (_FastRecord), with no bytes object made.
        """
        self._held = self.read()

    def read(self) -> bytes:
        """The payload (HTTP body for responses); marks the record truncated when the file ends early."""
        if self._held is not None:
            data, self._held = self._held, None
            return data
        data = self._reader.read() if self._reader is not None else b""
        self._reader = None
        if self._declared is not None and len(data) < self._declared:
            self.truncated = True
        return data


def split_content_type(value: str | None) -> tuple[str | None, str | None]:
    """(mime, charset) of a Content-Type value, both lower-case; None where absent."""
    if not value:
        return None, None
    parts = [p.strip() for p in value.split(";")]
    charset = None
    for p in parts[1:]:
        if p.lower().startswith("charset="):
            charset = p.split("=", 1)[1].strip("\"' ").lower() or None
    return parts[0].lower() or None, charset


def parse_fields(body: bytes) -> dict[str, str]:
    """A `name: value` record body (Common Crawl's metadata records, warcinfo): names lower-case."""
    out = {}
    for line in body.decode("utf-8", errors="replace").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _open(path: str, cc: CCConfig | None = None, start: int = 0):
    """A local file, or an http(s)/s3 URL through the resumable Common Crawl reader, from byte `start`."""
    if "://" in path:
        return open_stream(path, cc or CCConfig(), start)
    fh = open(Path(path), "rb")
    if start:
        fh.seek(start)
    return fh


def iter_records(path: str, backend: str = "auto", cc: CCConfig | None = None, start: int = 0) -> Iterator[Record]:
    """Yield the records of one WARC file (a local path or a URL) from byte `start` (a record boundary);
    a file that ends mid-record raises nothing.

    A read error stops the iteration with an OSError that names the file and offset; `next_member` finds
    where reading can go on.
    """
    use_fast = HAVE_FASTWARC and backend in ("auto", "fastwarc")
    with _open(path, cc, start) as fh:
        head = fh.peek(8)[:8]  # peek, not read + seek: a remote stream cannot seek back
        if not head:
            return
        if not head.startswith(_MAGIC):  # FastWARC skips junk silently: a file of it would read as "no pages"
            raise OSError(f"{path}: not a WARC file at byte {start} (starts with {head!r})")
        if use_fast:
            yield from _iter_fast(fh, path, start)
            return
        records = _iter_warcio(fh, path)
        if not start:
            yield from records
            return
        for rec in records:
            rec.offset += start  # the readers count from where the stream began
            yield rec


_GZIP_MEMBER = b"\x1f\x8b\x08"


def next_member(path: str, after: int, cc: CCConfig | None = None, window: int = 1 << 20) -> int | None:
    """The first offset >= `after` where a gzip member starts that inflates to a WARC record, or None.

    Where a damaged member ends cannot be known, so reading resumes at the next member that proves itself
    (its first inflated bytes are a WARC header): every record after the damage is still read.
    """
    import zlib

    with _open(path, cc, after) as fh:
        pos, buf = after, b""
        while True:
            chunk = fh.read(window)
            buf += chunk
            i, wait_at = 0, None
            while (i := buf.find(_GZIP_MEMBER, i)) != -1:
                if chunk and len(buf) - i < 4096:
                    wait_at = i  # too little left to judge: read more first
                    break
                try:
                    head = zlib.decompressobj(31).decompress(buf[i:i + 4096], 16)
                except zlib.error:
                    head = b""
                if head.startswith(b"WARC/"):
                    return pos + i
                i += 1
            if not chunk:
                return None
            cut = wait_at if wait_at is not None else max(len(buf) - 2, 0)  # a magic may straddle two reads
            pos += cut
            buf = buf[cut:]


def iter_member_records(data: bytes, offset: int, source: str = "", backend: str = "auto") -> Iterator[Record]:
    """The records of gzip members read by byte range from `offset` of a WARC file, with their true offsets.

    For index-selected records (tasks.io.ranges.read_records): data that does not inflate, or holds no record,
    raises an OSError naming `source` and the offset, so the caller can make it that record's error alone.
    """
    where = f"{source or 'WARC'} at byte {offset}"
    fh = io.BytesIO(data)
    records = _iter_fast(fh, where) if (HAVE_FASTWARC and backend != "warcio") else _iter_warcio(fh, where)
    found = False
    for rec in records:
        rec.offset += offset
        found = True
        yield rec
    if not found:
        raise OSError(f"{where}: no WARC record in {len(data)} bytes")


_FAST_NAMES: dict[int, str] = {}
if HAVE_FASTWARC:
    from fastwarc.warc import WarcHeader as _Header

    _FAST_NAMES = {int(t): n for t, n in ((_FastType.warcinfo, "warcinfo"), (_FastType.response, "response"),
                                          (_FastType.metadata, "metadata"), (_FastType.resource, "resource"))}
    _TARGET_URI, _WARC_DATE = _Header.WARC_TARGET_URI, _Header.WARC_DATE
    _RECORD_ID, _CONCURRENT_TO = _Header.WARC_RECORD_ID, _Header.WARC_CONCURRENT_TO


def _iter_fast(fh, path: str, start: int = 0) -> Iterator[Record]:
    """FastWARC's records as _FastRecord, offsets counted from `start` (where `fh` begins in the file).

    Parse errors become an OSError naming the file (_guarded).
    """
    kinds = _FastType.warcinfo | _FastType.response | _FastType.metadata | _FastType.resource
    names, resource = _FAST_NAMES, int(_FastType.resource)
    # quirks_mode: ClueWeb-era WARCs end HTTP header lines with a bare LF, which the strict parser misreads.
    for rec in _guarded(_FastIterator(fh, parse_http=True, record_types=kinds, quirks_mode=True), path):
        kind = int(rec.record_type)
        status = mime = charset = None
        if rec.is_http:
            status, mime, charset = rec.http_headers.status_code, rec.http_content_type, rec.http_charset
            mime = mime.strip().lower() or None if mime else None
            charset = charset.strip("\"' ").lower() or None if charset else None
        elif kind == resource:  # a resource record's own type
            mime = split_content_type(rec.headers.get("Content-Type"))[0]
        yield _FastRecord(rec, names[kind], rec.stream_pos + start, _bare_uri(rec.headers.get(_TARGET_URI)), status,
                          mime, charset)


class _FastRecord(Record):
    """A FastWARC record behind Record's interface.

    A full scan meets every record of ~1 GB files and skips ~95% of them after a look at the fields set here
    (type, target URI, HTTP status and Content-Type); the rest are read from FastWARC's header maps when asked,
    which stay valid after the iteration moves on. The payload does not (hold() keeps it).
    """

    __slots__ = ("_rec", "_state")

    def __init__(self, rec, kind: str, offset: int, uri: str | None, status: int | None, mime: str | None,
                 charset: str | None):  # Record's dataclass __init__ is not called: the other fields are lazy
        self.type = kind
        self.offset = offset
        self.uri = uri
        self.status = status
        self.mime = mime
        self.charset = charset
        self.truncated = False
        self._headers = None
        self._rec = rec
        self._state = 0  # 0: payload unread, 1: held in FastWARC's memory (frozen), 2: read

    def __repr__(self) -> str:
        return f"_FastRecord(type={self.type!r}, uri={self.uri!r}, offset={self.offset})"

    @property
    def date(self) -> str | None:
        return self._rec.headers.get(_WARC_DATE)

    @property
    def record_id(self) -> str | None:
        return self._rec.headers.get(_RECORD_ID)

    @property
    def concurrent_to(self) -> str | None:
        return self._rec.headers.get(_CONCURRENT_TO)

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = {k.lower(): v for k, v in self._rec.http_headers} if self._rec.is_http else {}
        return self._headers

    def _encoded(self) -> bool:
        """The HTTP payload has a transfer or content encoding to undo (the header names checked first: cheap)."""
        rec = self._rec
        if not rec.is_http:
            return False
        http = rec.http_headers
        names = b"\n%s\n" % b"\n".join(http.keys_bytes()).lower()
        if b"\ntransfer-encoding\n" not in names and b"\ncontent-encoding\n" not in names:
            return False
        return bool(http.get("Transfer-Encoding") or http.get("Content-Encoding"))

    def hold(self) -> None:
        """FastWARC copies the payload into the record (freeze): a fraction of the cost of a bytes object, which
        the ~95% of pages that are never parsed do without."""
        if self._state:
            return
        rec = self._rec
        declared = rec.content_length
        rec.freeze()  # content_length becomes the size held: smaller when the file ended early
        self._state = 1
        if rec.content_length < declared and not self._encoded():  # a decoded size says nothing about truncation
            self.truncated = True

    def read(self) -> bytes:
        if self._state == 2:
            return b""
        rec = self._rec
        reader = rec.reader
        declared = None if self._state == 1 else rec.content_length  # held: truncation already known
        if self._encoded():
            reader = _decoding(reader, rec.http_headers)
            declared = None
        self._state = 2
        data = reader.read()
        if declared is not None and len(data) < declared:
            self.truncated = True
        return data


def _bare_uri(uri: str | None) -> str | None:
    """WARC/1.0's grammar put the target URI in <...>, and wget still writes it so; warcio strips them too."""
    return uri[1:-1] if uri and uri.startswith("<") and uri.endswith(">") else uri


def _decoding(reader, http):
    """The payload with its HTTP transfer and content encodings undone as warcio does (raw bytes when bogus).

    FastWARC's own auto_decode raises on a body that is not encoded as declared, which would end the file.
    """
    from warcio.bufferedreaders import BufferedReader, ChunkedDataReader

    encoding = (http.get("Content-Encoding") or "").lower()
    decomp = encoding if encoding in BufferedReader.get_supported_decompressors() else None
    if (http.get("Transfer-Encoding") or "").lower() == "chunked":
        return ChunkedDataReader(reader, decomp_type=decomp)
    return BufferedReader(reader, decomp_type=decomp) if decomp else reader


def _guarded(records, path: str):
    """Iterate a library's records, turning its parse errors into an OSError naming the file."""
    it = iter(records)
    n = 0
    while True:
        try:
            rec = next(it)
        except StopIteration:
            return
        except Exception as err:  # corrupt gzip member or header: the library's own exception types
            raise OSError(f"{path}: unreadable WARC data after record {n}: {err}") from err
        n += 1
        yield rec


def _iter_warcio(fh, path: str) -> Iterator[Record]:
    from warcio.archiveiterator import ArchiveIterator

    it = ArchiveIterator(fh)
    it.reader = _strict_gzip_reader(fh, path)  # before the first record: its generator reads it.reader lazily
    for rec in _guarded(it, path):
        if rec.rec_type not in WANTED:
            continue
        offset = it.offset  # get_record_offset() would consume the payload
        h = rec.rec_headers
        http = rec.http_headers if rec.rec_type == "response" else None
        mime, charset = split_content_type(http.get_header("Content-Type")) if http else (None, None)
        if http is None:
            mime = split_content_type(h.get_header("Content-Type"))[0] if rec.rec_type == "resource" else None
        status = None
        if http is not None:
            try:
                status = int(http.get_statuscode())
            except (TypeError, ValueError):
                status = None
        if rec.length is None:  # the file ends inside the WARC headers: no Content-Length to compare with
            declared = -1
        else:
            declared = rec.length - (len(http.to_bytes()) if http is not None else 0)
        if http is not None and (http.get_header("Transfer-Encoding") or http.get_header("Content-Encoding")):
            declared = -1  # warcio decodes these: the decoded size says nothing about truncation
        yield Record(
            type=rec.rec_type,
            uri=h.get_header("WARC-Target-URI"),
            offset=offset,
            _warc={name: h.get_header(name) for name in ("WARC-Date", "WARC-Record-ID", "WARC-Concurrent-To")},
            status=status,
            mime=mime,
            charset=charset,
            _headers={k.lower(): v for k, v in http.headers} if http is not None else {},
            _reader=rec.content_stream(),
            _declared=declared if declared >= 0 else None,
        )


def _strict_gzip_reader(fh, path: str):
    """warcio's outer gzip reader, except that a member corrupt after its first block raises an OSError.

    warcio itself writes such an error to stderr and ends the file there, silently losing its remaining records.
    """
    import zlib

    from warcio.bufferedreaders import DecompressingBufferedReader

    class StrictReader(DecompressingBufferedReader):
        def _decompress(self, data):
            if self.decompressor is None or not data or self.num_block_read == 0:
                return super()._decompress(data)  # first block: warcio's plain-WARC detection
            try:
                return self.decompressor.decompress(data)
            except zlib.error as err:
                raise OSError(f"{path}: corrupt gzip data: {err}") from err

    return StrictReader(fh)


def read_record_at(path: str, offset: int, backend: str = "auto") -> tuple[Record, bytes]:
    """The record starting at `offset` of a local file (each record is its own gzip member) and its payload.

    Remote records are read by range instead: tasks.io.ranges.read_records, then iter_member_records.
    """
    if "://" in path:
        raise ValueError(f"read_record_at reads local files; read_records + iter_member_records read {path}")
    with _open(path) as fh:
        fh.seek(offset)
        gen = _iter_fast(fh, path) if (HAVE_FASTWARC and backend != "warcio") else _iter_warcio(fh, path)
        for rec in gen:
            if rec.offset != offset:  # the readers skip what is not a record (or not WANTED) to the next one
                break
            return rec, rec.read()
    raise OSError(f"{path}: no WARC record at offset {offset}")


def read_records_at(path: str, ranges: list[tuple[int, int]], cc: CCConfig | None = None,
                    stats: RangeStats | None = None, backend: str = "auto",
                    ) -> Iterator[tuple[int, Record | None, bytes | None, str | None]]:
    """(offset, record, payload, None) for the record at each (offset, length) of one WARC, by range reads.

    The remote counterpart of read_record_at, for index-selected records: a range that cannot be read, does not
    inflate or ends mid-record is (offset, None, None, "<reason>: detail") and the other records still come.
    """
    for offset, data, error in read_records(path, ranges, cc or CCConfig(), stats):
        if error is not None:
            yield offset, None, None, error
            continue
        try:
            rec = next(iter_member_records(data, offset, path, backend))
            payload = rec.read()
        except OSError as err:
            yield offset, None, None, f"{BAD_MEMBER}: {str(err)[:300]}"  # warcio quotes whole binary lines
            continue
        if rec.truncated:
            yield offset, None, None, f"{TRUNCATED_RECORD}: {path} at byte {offset}: the range ends mid-record"
        else:
            yield offset, rec, payload, None
