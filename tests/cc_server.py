"""A local stand-in for Common Crawl: a directory in its layout, served on 127.0.0.1 with Range and faults."""

from __future__ import annotations

import gzip
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CRAWL = "CC-MAIN-2020-34"  # the crawl of the real excerpt
OTHER_CRAWL = "CC-MAIN-2020-29"
SEGMENT = "1596439738015.38"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass
class Faults:
    """Switches a test flips while the server runs; a `*_times` of None means every response."""

    drop_after: int | None = None  # close the connection after this many body bytes ...
    drop_times: int | None = 1  # ... in this many responses
    stall_s: float = 0.0  # before such a close, stay silent this long (a read timeout on the client)
    truncate_to: int | None = None  # a 206 carries at most this many bytes, its Content-Range saying so ...
    truncate_times: int | None = None  # ... in this many responses
    ignore_range: bool = False  # answer Range requests with 200 and the whole file
    status: int | None = None  # answer with this status instead (503: CloudFront's "Slow Down") ...
    status_times: int | None = 1  # ... in this many responses

    def take(self, kind: str) -> bool:
        """Whether the fault `kind` applies to this response, using up one of its times."""
        times = getattr(self, f"{kind}_times")
        if times is None:
            return True
        if times <= 0:
            return False
        setattr(self, f"{kind}_times", times - 1)
        return True


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    range: str | None  # the Range header as sent
    status: int


@dataclass
class CCServer:
    """The server's address, what it saw, and its fault switches."""

    root: Path
    url: str = ""
    faults: Faults = field(default_factory=Faults)
    seen: list[Seen] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def requests_for(self, suffix: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.path.endswith(suffix)]


def _handler(server: CCServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as CloudFront: a client must cope with reused connections
        # headers and body go out in two writes; with Nagle on, the body waits ~40 ms for the client's delayed ACK
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            rel = Path(path.lstrip("/"))
            file = server.root / rel  # WARCs are links to the fixtures: no resolve(), no ".." instead
            asked = self.headers.get("Range")
            if ".." in rel.parts or not file.is_file():
                return self._reply(path, asked, 404, {}, b"not found", body)
            if server.faults.status is not None and server.faults.take("status"):
                return self._reply(path, asked, server.faults.status, {}, b"Slow Down", body)
            size = file.stat().st_size
            first, last, status = 0, size - 1, 200
            m = _RANGE.fullmatch(asked or "")
            if m and not server.faults.ignore_range:
                if m.group(1):
                    first = int(m.group(1))
                    last = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:  # bytes=-N: the last N bytes
                    first = max(0, size - int(m.group(2) or 0))
                if first >= size:
                    return self._reply(path, asked, 416, {"Content-Range": f"bytes */{size}"}, b"", body)
                status = 206
                if server.faults.truncate_to is not None and server.faults.take("truncate"):
                    last = min(last, first + server.faults.truncate_to - 1)
            headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
            if status == 206:
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            with open(file, "rb") as fh:
                fh.seek(first)
                data = fh.read(last - first + 1)
            self._reply(path, asked, status, headers, data, body)

        def _reply(self, path, asked, status, headers, data, body) -> None:
            with server._lock:
                server.seen.append(Seen(self.command, path, asked, status))
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(name, value)
            self.end_headers()
            if not body:
                return
            faults = server.faults
            if faults.drop_after is not None and len(data) > faults.drop_after and faults.take("drop"):
                self.wfile.write(data[:faults.drop_after])
                self.wfile.flush()
                time.sleep(faults.stall_s)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(data)

    return Handler


class serve:
    """`with serve(root) as server:` a threaded HTTP server on 127.0.0.1 for `root`, stopped on exit."""

    def __init__(self, root: Path):
        self.state = CCServer(Path(root))

    def __enter__(self) -> CCServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self._httpd.daemon_threads = True  # a stalled handler must not hold up the test's end
        self.state.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self.state

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def build_layout(root: Path, warcs: list[Path], crawl: str = CRAWL, extra_listed: tuple[str, ...] = ()) -> dict:
    """Common Crawl's layout under `root` for local WARC files (linked, not copied), with a columnar index.

    collinfo.json lists `crawl` and OTHER_CRAWL; warc.paths.gz lists the WARCs and `extra_listed` file names
    (listed, absent); cc-index-table.paths.gz lists the index built by write_index and one crawldiagnostics
    file that a subset=warc reader must leave out. Returns the relative paths written.
    """
    from tasks.io.ccindex import write_index

    root = Path(root)
    (root / "collinfo.json").write_text(json.dumps([
        {"id": crawl, "name": "Test crawl", "timegate": "", "cdx-api": ""},
        {"id": OTHER_CRAWL, "name": "An older crawl", "timegate": "", "cdx-api": ""},
    ]))
    base = f"crawl-data/{crawl}"
    warc_rel = []
    for warc in warcs:
        rel = f"{base}/segments/{SEGMENT}/warc/{Path(warc).name}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(Path(warc).resolve())
        warc_rel.append(rel)
    listed = warc_rel + [f"{base}/segments/{SEGMENT}/warc/{name}" for name in extra_listed]
    (root / base / "warc.paths.gz").write_bytes(gzip.compress("\n".join(listed).encode() + b"\n"))
    index = [p.relative_to(root).as_posix() for p in write_index([root / r for r in warc_rel], root, crawl)]
    diagnostics = f"cc-index/table/cc-main/warc/crawl={crawl}/subset=crawldiagnostics/part-00000.parquet"
    listing = index + ([] if diagnostics in index else [diagnostics])
    (root / base / "cc-index-table.paths.gz").write_bytes(gzip.compress("\n".join(listing).encode()))
    return {"warcs": warc_rel, "listed": listed, "index": index}
