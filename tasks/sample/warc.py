"""Common-Crawl-style WARC writing for generated crawls: warcinfo, request/response pairs and metadata records."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http import HTTPStatus
from urllib.parse import urlsplit

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "sample.danqing.test")
DEFAULT_START = datetime(2025, 1, 1, tzinfo=UTC)  # any fixed instant: the bytes never depend on when they are written
USER_AGENT = "danqing-sample/1.0 (generated offline; .test hosts never resolve)"

Headers = Iterable[tuple[str, str]]


def content_id(*parts: str) -> str:
    """A record id hashed from what the record is (its type, URI and a digest of its payload)."""
    return f"<urn:uuid:{uuid.uuid5(ID_NAMESPACE, chr(10).join(parts))}>"


def languages_cld2(languages: Iterable[Mapping[str, object]], text_bytes: int | None = None) -> str:
    """A metadata record's `languages-cld2` value as Common Crawl writes it: compact JSON, largest share first."""
    head: dict[str, object] = {"reliable": True}
    if text_bytes is not None:
        head["text-bytes"] = text_bytes
    return json.dumps({**head, "languages": list(languages)}, separators=(",", ":"))


class WarcWriter:
    """Records into one gzipped WARC (a gzip member each, mtime 0), through warcio, in Common Crawl's header order.

    Dates come from the writer's clock (`start`; each capture `step` later, or at the `when` it is given) and
    record ids from `record_id(type, uri[, payload digest])`, content-hashed unless another scheme is given, so
    the same calls write the same bytes: warcio's random ids and wall-clock dates are never used.
    """

    def __init__(self, fh, start: datetime = DEFAULT_START, step: timedelta = timedelta(seconds=7),
                 user_agent: str = USER_AGENT, record_id: Callable[..., str] = content_id) -> None:
        self._writer = WARCWriter(fh, gzip=True, warc_version="1.0")
        self.clock = start
        self._step = step
        self._user_agent = user_agent
        self._record_id = record_id
        self.warcinfo_id: str | None = None  # once written, every later record names it, as in Common Crawl

    def warcinfo(self, filename: str, fields: Mapping[str, str]) -> str:
        self.warcinfo_id = self._record_id("warcinfo", filename)
        self._write("warcinfo", "", _fields(fields), "application/warc-fields", {"WARC-Filename": filename},
                    record_id=self.warcinfo_id)
        return self.warcinfo_id

    def capture(self, url: str, body: bytes, content_type: str, *, status: int = 200, ip: str | None = None,
                headers: Headers | None = None, extra_headers: Headers = (), payload_type: str | None = None,
                request_headers: Headers | None = None, when: datetime | None = None) -> str:
        """A GET request and its response, as a crawler fetched them; returns the response's record id.

        `request_headers` replace the default User-Agent, Accept, Host and Connection; for `headers` and
        `extra_headers` see `response`.
        """
        self.clock = when or self.clock + self._step
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = StatusAndHeaders(f"GET {target} HTTP/1.1", list(request_headers or [
            ("User-Agent", self._user_agent),
            ("Accept", "*/*"),
            ("Host", parts.netloc),
            ("Connection", "Keep-Alive"),
        ]), is_http_request=True)
        request_id = self._record_id("request", url)
        self._write("request", url, b"", "application/http; msgtype=request", {"WARC-IP-Address": ip}, request,
                    request_id)
        return self.response(url, body, content_type, status=status, ip=ip, headers=headers,
                             extra_headers=extra_headers, payload_type=payload_type, concurrent_to=request_id)

    def response(self, url: str, body: bytes, content_type: str, *, status: int = 200, ip: str | None = None,
                 headers: Headers | None = None, extra_headers: Headers = (), payload_type: str | None = None,
                 concurrent_to: str | None = None) -> str:
        """A response record (alone, or `concurrent_to` its request); returns its record id.

        Its HTTP headers are `headers`, by default Date, Server, Content-Type (`content_type`), Content-Length and
        Connection, then `extra_headers` (an X-Robots-Tag, say).
        """
        if headers is None:
            headers = [
                ("Date", format_datetime(self.clock, usegmt=True)),
                ("Server", "nginx"),
                ("Content-Type", content_type),
                ("Content-Length", str(len(body))),
                ("Connection", "keep-alive"),
            ]
        http = StatusAndHeaders(f"{status} {HTTPStatus(status).phrase}", [*headers, *extra_headers],
                                protocol="HTTP/1.1")
        record_id = self._record_id("response", url, hashlib.sha256(body).hexdigest())
        self._write("response", url, body, "application/http; msgtype=response", {
            "WARC-Concurrent-To": concurrent_to,
            "WARC-IP-Address": ip,
            "WARC-Identified-Payload-Type": payload_type,
        }, http, record_id)
        return record_id

    def metadata(self, url: str, fields: Mapping[str, object], concurrent_to: str | None = None) -> str:
        """A metadata record of `fields` (fetchTimeMs, charset-detected, languages-cld2, ...); returns its id."""
        payload = _fields(fields)
        record_id = self._record_id("metadata", url, hashlib.sha256(payload).hexdigest())
        self._write("metadata", url, payload, "application/warc-fields", {"WARC-Concurrent-To": concurrent_to},
                    record_id=record_id)
        return record_id

    def _write(self, rec_type: str, uri: str, payload: bytes, content_type: str, extra: Mapping[str, str | None],
               http_headers: StatusAndHeaders | None = None, record_id: str = "") -> None:
        headers = {
            "WARC-Type": rec_type,
            "WARC-Date": self.clock.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "WARC-Record-ID": record_id,
            "Content-Length": "0",  # placeholder so warcio keeps Common Crawl's header order
            "Content-Type": content_type,
        }
        if rec_type != "warcinfo" and self.warcinfo_id is not None:
            headers["WARC-Warcinfo-ID"] = self.warcinfo_id
        headers.update({name: value for name, value in extra.items() if value is not None})
        self._writer.write_record(self._writer.create_warc_record(
            uri, rec_type, payload=io.BytesIO(payload), length=len(payload), warc_content_type=content_type,
            warc_headers_dict=headers, http_headers=http_headers,
        ))


def _fields(fields: Mapping[str, object]) -> bytes:
    return "".join(f"{name}: {value}\r\n" for name, value in fields.items()).encode()
