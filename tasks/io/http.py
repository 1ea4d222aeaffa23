"""HTTP transport of the fetch stage: many URLs in, one FetchResult each, network failures as reasons."""

import asyncio
import concurrent.futures
import ipaddress
import socket
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

HTTP_ERROR = "fetch.http_error"
TIMEOUT = "fetch.timeout"
TOO_LARGE = "fetch.too_large"

_CHUNK_BYTES = 64 * 1024
# What a bad URL or the network can raise; anything else is a bug and propagates.
_NETWORK_ERRORS = (aiohttp.ClientError, OSError, ValueError)


@dataclass(frozen=True)
class HttpConfig:
    total_timeout_s: float = 30.0  # whole-request deadline (connect + headers + body), not a socket timeout
    connect_timeout_s: float = 10.0  # getting a connected socket, DNS included
    max_bytes: int = 20_000_000  # body cap, checked against Content-Length and again while streaming
    concurrency: int = 64  # simultaneous requests overall
    per_host: int = 8  # simultaneous requests per scheme+host+port
    user_agent: str = "danqing/0.1 (image-text dataset research; +https://github.com/danqing-project/danqing)"
    resolve: tuple[tuple[str, str], ...] | None = None  # (host, ip) pairs like curl --resolve; set = others fail
    max_redirects: int = 5  # redirects followed before giving up; 0 follows none

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.per_host < 1:
            raise ValueError(f"concurrency and per_host must be >= 1, got {self.concurrency}, {self.per_host}")
        if self.max_bytes < 0 or self.max_redirects < 0:
            raise ValueError(f"max_bytes and max_redirects must be >= 0, got {self.max_bytes}, {self.max_redirects}")
        if self.total_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")


@dataclass(frozen=True)
class FetchResult:
    url: str
    ok: bool
    reason: str | None  # None when ok, else fetch.http_error | fetch.timeout | fetch.too_large
    status: int | None  # HTTP status of the last response, if one came
    body: bytes | None  # only when ok
    headers: dict[str, str]  # lower-case names; {} when no response came
    error: str | None  # short human-readable detail when not ok


class StaticResolver(AbstractResolver):
    """Resolves only the hosts it was given, like curl --resolve; any other host fails without a DNS query."""

    def __init__(self, pairs: tuple[tuple[str, str], ...]):
        # ip_address() raises on a typo here rather than on every URL of a shard later.
        self._ips = {host.lower().rstrip("."): str(ipaddress.ip_address(ip)) for host, ip in pairs}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        ip = self._ips.get(host.lower().rstrip("."))
        if ip is None:
            # A gaierror is what aiohttp expects from a failed lookup; it becomes ClientConnectorDNSError.
            raise socket.gaierror(socket.EAI_NONAME, "not in the resolve mapping")
        return [
            ResolveResult(
                hostname=host,
                host=ip,
                port=port,
                family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
        ]

    async def close(self) -> None:
        pass


class HttpFetcher:
    """Fetches URLs concurrently, each under one total deadline and one body cap."""

    def __init__(self, config: HttpConfig = HttpConfig()):
        self.config = config
        self._resolver = StaticResolver(config.resolve) if config.resolve is not None else None

    def fetch_many(self, urls: list[str]) -> list[FetchResult]:
        """Fetch `urls` and return one result each, in order; usable with or without a running event loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.fetch_many_async(urls))
        # A running loop cannot be re-entered from its own thread, so the fetch gets a fresh loop on a worker.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(lambda: asyncio.run(self.fetch_many_async(urls))).result()

    async def fetch_many_async(self, urls: list[str]) -> list[FetchResult]:
        cfg = self.config
        connector = aiohttp.TCPConnector(limit=cfg.concurrency, limit_per_host=cfg.per_host, resolver=self._resolver)
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=cfg.total_timeout_s, connect=cfg.connect_timeout_s),
            headers={"User-Agent": cfg.user_agent},
            # Unrelated image URLs share nothing; a jar would only grow and leak state between hosts.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        # aiohttp's deadline clock starts before it waits for a pooled connection, so without these slots a
        # URL queued behind others would time out; they are taken first and the clock starts after.
        overall = asyncio.Semaphore(cfg.concurrency)
        per_host: defaultdict[tuple, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(cfg.per_host))
        async with session:
            return list(await asyncio.gather(*(self._fetch_one(session, url, overall, per_host) for url in urls)))

    async def _fetch_one(
        self,
        session: aiohttp.ClientSession,
        url: str,
        overall: asyncio.Semaphore,
        per_host: defaultdict[tuple, asyncio.Semaphore],
    ) -> FetchResult:
        # Host slot before the overall slot, so a busy host never holds overall slots other hosts could use.
        async with per_host[_origin(url)], overall:
            try:
                return await self._get(session, url)
            except aiohttp.TooManyRedirects as exc:  # before _NETWORK_ERRORS, which it is one of
                last = exc.history[-1]
                detail = f"more than {self.config.max_redirects} redirects"
                return _failed(url, HTTP_ERROR, detail, last.status, _lower_headers(last.headers))
            except _NETWORK_ERRORS as exc:
                return _failed(url, *self._classify(exc))

    async def _get(self, session: aiohttp.ClientSession, url: str) -> FetchResult:
        cfg = self.config
        # aiohttp stops once it has counted max_redirects redirect responses, i.e. it follows one fewer.
        async with session.get(url, max_redirects=cfg.max_redirects + 1) as resp:
            headers = _lower_headers(resp.headers)
            if not 200 <= resp.status < 300:
                return _failed(url, HTTP_ERROR, f"HTTP {resp.status}", resp.status, headers)
            if resp.content_length is not None and resp.content_length > cfg.max_bytes:
                detail = f"Content-Length {resp.content_length} exceeds {cfg.max_bytes} bytes"
                return _failed(url, TOO_LARGE, detail, resp.status, headers)
            try:
                body = await self._read_capped(resp)
            except _NETWORK_ERRORS as exc:
                # Caught here rather than in _fetch_one so the result keeps the status that did arrive.
                return _failed(url, *self._classify(exc), resp.status, headers)
            if body is None:
                return _failed(url, TOO_LARGE, f"exceeded {cfg.max_bytes} bytes", resp.status, headers)
            return FetchResult(url, True, None, resp.status, body, headers, None)

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes | None:
        """The body, or None as soon as it passes max_bytes (counted after decompression, so no bombs)."""
        body = bytearray()
        async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
            body += chunk
            if len(body) > self.config.max_bytes:
                return None
        return bytes(body)

    def _classify(self, exc: BaseException) -> tuple[str, str]:
        """(reason, detail) for a request that failed with `exc`."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return TIMEOUT, f"no connection within {self.config.connect_timeout_s} s"
        if isinstance(exc, TimeoutError):  # aiohttp timeout errors are ClientErrors too: check first
            return TIMEOUT, f"no complete response within {self.config.total_timeout_s} s"
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return HTTP_ERROR, f"cannot resolve host {exc.host}: {exc.os_error.strerror}"
        if isinstance(exc, aiohttp.NonHttpUrlClientError):
            return HTTP_ERROR, f"unsupported scheme: {exc}"
        if isinstance(exc, aiohttp.InvalidURL):
            return HTTP_ERROR, f"invalid URL: {exc}"
        return HTTP_ERROR, f"{type(exc).__name__}: {exc}"


def _origin(url: str) -> tuple:
    try:
        parsed = URL(url)
        return (parsed.scheme, parsed.host, parsed.port)
    except ValueError:
        # The request itself will fail on this URL; it only needs some slot to queue in.
        return ()


def _lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        # Repeated fields combine with ", " (RFC 9110 5.3), so nothing is lost in a plain dict.
        merged[key] = f"{merged[key]}, {value}" if key in merged else value
    return merged


def _failed(
    url: str, reason: str, error: str, status: int | None = None, headers: dict[str, str] | None = None
) -> FetchResult:
    return FetchResult(url, False, reason, status, None, headers or {}, error)
