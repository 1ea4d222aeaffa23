"""HTTP transport of the fetch stage: many URLs in, one FetchResult each, network failures and refusals as reasons."""

import asyncio
import concurrent.futures
import ipaddress
import socket
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
import uvloop
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from tasks.io.polite import (
    BLOCKED_ADDRESS,
    OPT_OUT,
    ROBOTS,
    AddressGuard,
    Robots,
    is_ip_literal,
    opted_out,
    robots_agent,
    robots_url,
)
from tasks.io.retry import backoff_s, is_transient_error, is_transient_web_status, retry_after_s

HTTP_ERROR = "fetch.http_error"
TIMEOUT = "fetch.timeout"
TOO_LARGE = "fetch.too_large"

_CHUNK_BYTES = 64 * 1024
# What a bad URL or the network can raise; anything else is a bug and propagates.
_NETWORK_ERRORS = (aiohttp.ClientError, OSError, ValueError)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class HttpConfig:
    total_timeout_s: float = 30.0  # whole-request deadline (connect + headers + body + redirects), per attempt
    connect_timeout_s: float = 10.0  # getting a connected socket, DNS included
    max_bytes: int = 20_000_000  # body cap, checked against Content-Length and again while streaming
    concurrency: int = 64  # simultaneous requests overall
    per_host: int = 8  # simultaneous requests per scheme+host+port
    per_host_rate: float = 0.0  # request starts per second per host; 0: no limit
    user_agent: str = "danqing/0.1 (image-text dataset research; +https://github.com/danqing-project/danqing)"
    resolve: tuple[tuple[str, str], ...] | None = None  # (host, ip) pairs like curl --resolve; set = others fail
    max_redirects: int = 5  # redirects followed before giving up; 0 follows none
    retries: int = 2  # extra attempts after a transient failure (connect error, timeout, 429, 5xx); 0: none
    backoff_s: float = 0.5  # first retry waits this, doubling per attempt, plus up to as much again of jitter
    max_retry_after_s: float = 30.0  # a longer Retry-After is not waited for: the URL fails at once
    breaker_failures: int = 5  # consecutive transient failures that open a host's circuit; 0: never open
    breaker_cooldown_s: float = 60.0  # an open circuit lets a trial request through after this long
    dns_ttl_s: float = 300.0  # how long a host's resolved addresses are reused
    block_private: bool = True  # SSRF guard: refuse loopback, private, link-local, multicast, metadata addresses
    allow_networks: tuple[str, ...] = ()  # CIDRs the guard lets through (tests, intranet mirrors)
    robots: bool = True  # honour robots.txt, fetched once per host
    robots_max_bytes: int = 500_000  # robots.txt read up to this size (RFC 9309: at least 500 KiB)
    robots_ttl_s: float = 86_400.0  # a host's robots.txt is reused this long (RFC 9309: at most 24 h)
    opt_out: bool = True  # honour X-Robots-Tag noai / noimageai / noindex / noimageindex

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.per_host < 1:
            raise ValueError(f"concurrency and per_host must be >= 1, got {self.concurrency}, {self.per_host}")
        if self.max_bytes < 0 or self.max_redirects < 0 or self.retries < 0 or self.breaker_failures < 0:
            raise ValueError("max_bytes, max_redirects, retries and breaker_failures must be >= 0")
        if self.total_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")
        if self.per_host_rate < 0 or self.backoff_s < 0:
            raise ValueError("per_host_rate and backoff_s must be >= 0")


@dataclass(frozen=True)
class FetchResult:
    url: str
    ok: bool
    reason: str | None  # None when ok, else a fetch.* reason
    status: int | None  # HTTP status of the last response, if one came
    body: bytes | None  # only when ok
    headers: dict[str, str]  # lower-case names; {} when no response came
    error: str | None  # short human-readable detail when not ok
    attempts: int = 1  # requests made for this URL (retries included; 0 when refused before any)
    transient: bool = False  # a failure that may succeed later (connect error, timeout, 429, 5xx)
    retry_after: float | None = field(default=None, compare=False)  # seconds the server asked us to wait


# (resolve mapping, user agent) -> (DNS cache, robots.txt cache), for the life of the process
_CACHES: dict[tuple, tuple[dict, dict]] = {}
_MAX_CACHED = 50_000  # hosts per cache: a long-lived worker sees millions; past this a cache starts over


def _remember(cache: dict, key: str, value) -> None:
    if len(cache) >= _MAX_CACHED:
        cache.clear()
    cache[key] = value


class BlockedAddressError(OSError):
    """A host resolved only to addresses the SSRF guard refuses; raised before any connection."""


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
        return [_result(host, ip, port)]

    async def close(self) -> None:
        pass


def _result(host: str, ip: str, port: int) -> ResolveResult:
    return ResolveResult(hostname=host, host=ip, port=port, family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                         proto=0, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)


class GuardedResolver(AbstractResolver):
    """A caching resolver that hands aiohttp only addresses the guard allows, so a refused one is never dialled.

    The cache (host -> expiry, addresses) outlives the event loop and is shared by every request of a
    fetcher, so each host costs one lookup per TTL; concurrent lookups of one host share one query.
    """

    def __init__(self, inner: AbstractResolver, guard: AddressGuard, ttl_s: float, cache: dict):
        self._inner, self._guard, self._ttl, self._cache = inner, guard, ttl_s, cache
        self._pending: dict[str, asyncio.Future] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        key = host.lower().rstrip(".")
        hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            ips = hit[1]
        else:
            if key not in self._pending:
                self._pending[key] = asyncio.ensure_future(self._lookup(host, key, family))
            try:
                ips = await asyncio.shield(self._pending[key])
            finally:
                if self._pending.get(key) is not None and self._pending[key].done():
                    self._pending.pop(key, None)
        allowed = [ip for ip in ips if self._guard.why_blocked(ip) is None]
        if not allowed:
            raise BlockedAddressError(f"{host.rstrip('.')} resolves to {self._guard.why_blocked(ips[0])}")
        return [_result(host, ip, port) for ip in allowed]

    async def _lookup(self, host: str, key: str, family) -> list[str]:
        found = await self._inner.resolve(host, 0, family)
        ips = list(dict.fromkeys(r["host"] for r in found))
        _remember(self._cache, key, (time.monotonic() + self._ttl, ips))
        return ips

    async def close(self) -> None:
        await self._inner.close()


@dataclass
class _Host:
    """Per-host state of one fetch_many call: rate reservation and circuit breaker."""

    next_start: float = 0.0
    failures: int = 0  # consecutive transient failures
    opened_at: float | None = None
    last: tuple[str, str] = (HTTP_ERROR, "")


@dataclass
class _Call:
    """The state of one fetch_many call: its session, slots, hosts and robots.txt fetches under way."""

    session: aiohttp.ClientSession
    overall: asyncio.Semaphore
    slots: defaultdict[tuple, asyncio.Semaphore]
    hosts: defaultdict[tuple, _Host]
    robots_pending: dict[str, asyncio.Future]


@dataclass
class _Trail:
    """The last response of an attempt, kept so a deadline hit while reading still reports its status."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


class HttpFetcher:
    """Fetches URLs concurrently and politely, each under one total deadline and one body cap."""

    def __init__(self, config: HttpConfig = HttpConfig(), shared_caches: bool = True):
        """`shared_caches=False`: DNS answers and robots.txt of this fetcher's own, asked afresh (a release's
        opt-out re-check must not reuse what a run in the same process read)."""
        self.config = config
        self.guard = AddressGuard(config.block_private, config.allow_networks)
        self._static = config.resolve
        if config.resolve is not None:
            StaticResolver(config.resolve)  # a typo in the mapping fails here
        self._agent = robots_agent(config.user_agent)
        # Shared by every fetcher of this process with the same resolution and agent (a worker runs many shards):
        # one DNS lookup per host and dns_ttl_s, one robots.txt per host and robots_ttl_s.
        key = (config.resolve, config.user_agent)
        self._dns_cache, self._robots = _CACHES.setdefault(key, ({}, {})) if shared_caches else ({}, {})

    def fetch_many(self, urls: list[str]) -> list[FetchResult]:
        """Fetch `urls` and return one result each, in order; usable with or without a running event loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._run(urls)
        # A running loop cannot be re-entered from its own thread, so the fetch gets a fresh loop on a worker.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(self._run, urls).result()

    def _run(self, urls: list[str]) -> list[FetchResult]:
        # uvloop: libuv's loop costs aiohttp about a third less CPU per request than asyncio's own
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(self.fetch_many_async(urls))

    async def fetch_many_async(self, urls: list[str]) -> list[FetchResult]:
        cfg = self.config
        inner = StaticResolver(self._static) if self._static is not None else aiohttp.ThreadedResolver()
        resolver = GuardedResolver(inner, self.guard, cfg.dns_ttl_s, self._dns_cache)
        connector = aiohttp.TCPConnector(limit=cfg.concurrency, limit_per_host=cfg.per_host, resolver=resolver,
                                         use_dns_cache=False)  # the resolver caches, after the guard
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout_s),
            headers={"User-Agent": cfg.user_agent},
            # Unrelated image URLs share nothing; a jar would only grow and leak state between hosts.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        # aiohttp's clocks start before it waits for a pooled connection, so without these slots a URL queued
        # behind others would time out; they are taken first and the deadline starts after.
        call = _Call(session, asyncio.Semaphore(cfg.concurrency),
                     defaultdict(lambda: asyncio.Semaphore(cfg.per_host)), defaultdict(_Host), {})
        async with session:
            return list(await asyncio.gather(*(self._fetch_one(call, url) for url in urls)))

    async def _fetch_one(self, call: _Call, url: str) -> FetchResult:
        cfg = self.config
        origin = _origin(url)
        host = call.hosts[origin]
        result: FetchResult | None = None
        for attempt in range(1, cfg.retries + 2):
            await self._rate_wait(host)
            async with call.slots[origin], call.overall:  # host slot first: a busy host holds no overall slot
                # checked once the slot is ours: the requests queued behind a failing one see its outcome
                refused = self._circuit_open(host)
                if refused is not None:
                    return _failed(url, refused[0], refused[1], attempts=attempt - 1, transient=True)
                result = await self._attempt(call, url)
            result = _with_attempts(result, attempt)
            if not result.transient:
                if result.reason is None or result.status is not None:
                    host.failures, host.opened_at = 0, None  # the host answered: it is up
                return result
            self._count_failure(host, result)
            if attempt > cfg.retries:
                break
            # backoff_s is the shortest first wait (HttpConfig), so the policy's step, half of it jitter, is twice it
            delay = backoff_s(attempt - 1, 2 * cfg.backoff_s)
            if result.retry_after is not None:
                if result.retry_after > cfg.max_retry_after_s:
                    break
                delay = max(delay, result.retry_after)
                host.next_start = max(host.next_start, time.monotonic() + result.retry_after)  # the whole host waits
            await asyncio.sleep(delay)
        assert result is not None
        return result

    def _circuit_open(self, host: _Host) -> tuple[str, str] | None:
        if host.opened_at is None:
            return None
        if time.monotonic() - host.opened_at >= self.config.breaker_cooldown_s:
            host.opened_at = None  # half-open: this request is the trial; one more failure re-opens
            host.failures = max(0, self.config.breaker_failures - 1)
            return None
        return host.last[0], f"circuit open after {host.failures} failures in a row: {host.last[1]}"

    def _count_failure(self, host: _Host, result: FetchResult) -> None:
        host.failures += 1
        host.last = (result.reason or HTTP_ERROR, result.error or "")
        if self.config.breaker_failures and host.failures >= self.config.breaker_failures and host.opened_at is None:
            host.opened_at = time.monotonic()

    async def _rate_wait(self, host: _Host) -> None:
        now = time.monotonic()
        start = max(now, host.next_start)
        if self.config.per_host_rate > 0:
            host.next_start = start + 1.0 / self.config.per_host_rate
        if start > now:
            await asyncio.sleep(start - now)

    async def _attempt(self, call: _Call, url: str) -> FetchResult:
        trail = _Trail()
        try:
            async with asyncio.timeout(self.config.total_timeout_s):
                return await self._follow(call, url, trail)
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, BlockedAddressError):
                return _failed(url, BLOCKED_ADDRESS, str(exc.os_error), attempts=0)
            return _failed(url, *self._classify(exc), trail.status, trail.headers)
        except _NETWORK_ERRORS as exc:
            return _failed(url, *self._classify(exc), trail.status, trail.headers, transient=_transient_error(exc))

    async def _follow(self, call: _Call, url: str, trail: _Trail) -> FetchResult:
        """One attempt: each hop checked (address, robots) before it is requested, redirects followed by hand."""
        cfg = self.config
        current, seen = url, {url}
        for hop in range(cfg.max_redirects + 1):
            refused = await self._refuse(call, current)
            if refused is not None:
                return _failed(url, *refused, trail.status, trail.headers, attempts=0)
            async with call.session.get(current, allow_redirects=False) as resp:
                headers = _lower_headers(resp.headers)
                trail.status, trail.headers = resp.status, headers
                location = headers.get("location")
                if resp.status in _REDIRECTS and location:
                    if hop == cfg.max_redirects:
                        return _failed(url, HTTP_ERROR, f"more than {cfg.max_redirects} redirects", resp.status,
                                       headers)
                    current = str(resp.url.join(URL(location)))
                    if current in seen:
                        return _failed(url, HTTP_ERROR, f"redirect loop at {current}", resp.status, headers)
                    seen.add(current)
                    continue
                return await self._answer(url, resp, headers)
        raise AssertionError("unreachable: the last hop returns")

    async def _refuse(self, call: _Call, url: str) -> tuple[str, str] | None:
        """(reason, detail) when `url` must not be requested: a refused literal address, or robots.txt."""
        try:
            parsed = URL(url)
        except ValueError:
            return None  # the request raises its own invalid-URL error
        if not parsed.host or parsed.scheme not in ("http", "https"):
            return None
        if is_ip_literal(parsed.host):
            why = self.guard.why_blocked(parsed.host.strip("[]"))
            if why is not None:
                return BLOCKED_ADDRESS, why
        if self.config.robots:
            robots = await self._robots_for(call, robots_url(parsed.scheme, parsed.host, parsed.port))
            if robots is not None and not robots.allows(self._agent, url):
                return ROBOTS, f"robots.txt of {parsed.host} disallows this path for {self._agent}"
        return None

    async def _robots_for(self, call: _Call, where: str) -> Robots | None:
        hit = self._robots.get(where)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        if where not in call.robots_pending:
            call.robots_pending[where] = asyncio.ensure_future(self._get_robots(call, where))
        # shielded: one URL's deadline must not cancel the fetch that other URLs of the host wait on
        return await asyncio.shield(call.robots_pending[where])

    async def _get_robots(self, call: _Call, where: str) -> Robots | None:
        """The host's rules; None (allow) when it cannot be reached: the image request then fails on its own.

        Redirects (RFC 9309: at least five) are followed by hand, so the guard sees each hop's address too.
        """
        try:
            async with asyncio.timeout(self.config.total_timeout_s):
                current = where
                for _ in range(6):
                    host = URL(current).host or ""
                    if is_ip_literal(host) and self.guard.why_blocked(host.strip("[]")) is not None:
                        return None
                    async with call.session.get(current, allow_redirects=False) as resp:
                        location = resp.headers.get("Location")
                        if resp.status in _REDIRECTS and location:
                            current = str(resp.url.join(URL(location)))
                            continue
                        body = await _read_capped(resp, self.config.robots_max_bytes) if resp.status < 300 else None
                        robots = Robots(resp.status, body or b"")
                        break
                else:
                    robots = Robots(404, None)  # too many redirects: RFC 9309 treats it as unavailable
        except _NETWORK_ERRORS:
            return None  # not cached: the next URL of the host asks again
        _remember(self._robots, where, (time.monotonic() + self.config.robots_ttl_s, robots))
        return robots

    async def _answer(self, url: str, resp: aiohttp.ClientResponse, headers: dict[str, str]) -> FetchResult:
        cfg = self.config
        if not 200 <= resp.status < 300:  # first: error pages often say noindex, and they are errors
            return _failed(url, HTTP_ERROR, f"HTTP {resp.status}", resp.status, headers,
                           transient=is_transient_web_status(resp.status),
                           retry_after=retry_after_s(headers.get("retry-after")))
        if cfg.opt_out:
            directive = opted_out(headers, self._agent)
            if directive is not None:  # decided on the headers: the body is never read
                return _failed(url, OPT_OUT, f"X-Robots-Tag: {directive}", resp.status, headers)
        if resp.content_length is not None and resp.content_length > cfg.max_bytes:
            detail = f"Content-Length {resp.content_length} exceeds {cfg.max_bytes} bytes"
            return _failed(url, TOO_LARGE, detail, resp.status, headers)
        if resp.content_length is not None and "content-encoding" not in headers:
            body = await resp.read()  # exactly Content-Length bytes, already checked against the cap: one read
        else:  # unknown or encoded length: counted while streaming, after decompression, so no bombs
            body = await _read_capped(resp, cfg.max_bytes)
        if body is None:
            return _failed(url, TOO_LARGE, f"exceeded {cfg.max_bytes} bytes", resp.status, headers)
        return FetchResult(url, True, None, resp.status, body, headers, None)

    def _classify(self, exc: BaseException) -> tuple[str, str]:
        """(reason, detail) for a request that failed with `exc`."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return TIMEOUT, f"no connection within {self.config.connect_timeout_s} s"
        if isinstance(exc, TimeoutError):  # aiohttp timeout errors are ClientErrors too: check first
            return TIMEOUT, f"no complete response within {self.config.total_timeout_s} s"
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return HTTP_ERROR, f"cannot resolve host {exc.host}: {exc.os_error.strerror or exc.os_error}"
        if isinstance(exc, aiohttp.NonHttpUrlClientError):
            return HTTP_ERROR, f"unsupported scheme: {exc}"
        if isinstance(exc, aiohttp.InvalidURL):
            return HTTP_ERROR, f"invalid URL: {exc}"
        return HTTP_ERROR, f"{type(exc).__name__}: {exc}"


def _transient_error(exc: BaseException) -> bool:
    """The retry policy's transient errors (refused, reset, timed out) and aiohttp's dropped connections and cut
    bodies; bad URLs and DNS misses are not (none of them is a TimeoutError, so every TIMEOUT is transient)."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError | aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return False
    return isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError) or is_transient_error(exc)


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes | None:
    """The body, or None as soon as it passes `cap` (counted after decompression, so no bombs)."""
    body = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
        body += chunk
        if len(body) > cap:
            return None
    return bytes(body)


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


def _with_attempts(result: FetchResult, attempt: int) -> FetchResult:
    # A refusal before any request (guard, robots) made none; otherwise this was request number `attempt`.
    made = attempt - 1 + (result.attempts > 0)
    return FetchResult(result.url, result.ok, result.reason, result.status, result.body, result.headers,
                       result.error, made, result.transient, result.retry_after)


def _failed(
    url: str, reason: str, error: str, status: int | None = None, headers: dict[str, str] | None = None,
    attempts: int = 1, transient: bool = False, retry_after: float | None = None,
) -> FetchResult:
    return FetchResult(url, False, reason, status, None, headers or {}, error, attempts, transient, retry_after)
