"""Tests for tasks.io.http against a real aiohttp server on 127.0.0.1."""

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import aiohttp
import pytest
from _fixtures import ROOT
from aiohttp import web
from local_http import gigabyte, serve

from tasks.io.http import HTTP_ERROR, TIMEOUT, TOO_LARGE, HttpConfig, HttpFetcher
from tasks.io.polite import BLOCKED_ADDRESS, OPT_OUT, ROBOTS, AddressGuard, opted_out

HOST = "images.example.test"  # only reachable through the `resolve` mapping, so no test needs DNS
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
STREAM_LIMIT = 10_000  # max_bytes for the size tests; the streaming routes send far more


@dataclass
class Seen:
    user_agents: list[str | None] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


SEEN = web.AppKey("seen", Seen)
HITS = web.AppKey("hits", defaultdict)  # path -> requests that reached the server


async def image(request: web.Request) -> web.Response:
    request.app[SEEN].user_agents.append(request.headers.get("User-Agent"))
    return web.Response(body=IMAGE, content_type="image/png")


async def status(request: web.Request) -> web.Response:
    return web.Response(status=int(request.match_info["code"]), text="nope")


async def trickle(request: web.Request) -> web.StreamResponse:
    # A byte every 0.1 s for 3 s: each read is quick, only a deadline on the whole request stops it.
    resp = web.StreamResponse(headers={"Content-Type": "image/png"})
    await resp.prepare(request)
    for _ in range(30):
        await resp.write(b"x")
        await asyncio.sleep(0.1)
    return resp


async def endless(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for _ in range(1000):
        await resp.write(b"x" * 1024)
    return resp


async def robots_txt(request: web.Request) -> web.Response:
    request.app[HITS][request.path] += 1
    return web.Response(text="User-agent: *\nDisallow: /private/\n\nUser-agent: otherbot\nDisallow: /\n")


async def opt_out(request: web.Request) -> web.Response:
    request.app[HITS][request.path] += 1
    status = int(request.query.get("status", "200"))
    return web.Response(body=IMAGE, status=status,
                        headers={"X-Robots-Tag": request.match_info["directive"].replace("_", " ")})


async def fail_first(request: web.Request) -> web.Response:
    """Fails with {code} on the first request of each {id} (429 and 503 saying Retry-After: 1), then serves."""
    hits = request.app[HITS]
    hits[request.path] += 1
    if hits[request.path] == 1 or request.match_info["id"].startswith("always"):
        code = int(request.match_info["code"])
        headers = {"Retry-After": "1"} if code in (429, 503) and "ra" in request.match_info["id"] else {}
        return web.Response(status=code, text="try later", headers=headers)
    return web.Response(body=IMAGE, content_type="image/png")


async def loop_redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound(f"/loop/{1 - int(request.match_info['n'])}")


async def redirect_to(request: web.Request) -> web.Response:
    raise web.HTTPFound(f"http://{request.match_info['address']}/x.png")


async def big_length(request: web.Request) -> web.StreamResponse:
    # Declares 1 GB, sends 1 KiB and stalls: only a Content-Length check ends this quickly as too_large.
    resp = web.StreamResponse()
    resp.content_length = 1_000_000_000
    await resp.prepare(request)
    await resp.write(b"x" * 1024)
    await asyncio.sleep(10)
    return resp


async def redirect(request: web.Request) -> web.Response:
    left = int(request.match_info["left"])
    raise web.HTTPFound(f"/redirect/{left - 1}" if left > 0 else "/image.png")


async def to_ftp(request: web.Request) -> web.Response:
    raise web.HTTPFound("ftp://files.example.test/a.png")


async def reset(request: web.Request) -> web.Response:
    assert request.transport is not None
    request.transport.abort()
    await asyncio.sleep(1)
    return web.Response()


async def held(request: web.Request) -> web.Response:
    seen = request.app[SEEN]
    seen.in_flight += 1
    seen.max_in_flight = max(seen.max_in_flight, seen.in_flight)
    try:
        await asyncio.sleep(0.05)
    finally:
        seen.in_flight -= 1
    return web.Response(body=request.query["i"].encode())


@pytest.fixture(scope="module")
def server():
    """The app, served from its own loop on a background thread so the fetcher can block this one."""
    app = web.Application()
    app[SEEN] = Seen()
    app[HITS] = defaultdict(int)
    app.router.add_get("/image.png", image)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/trickle", trickle)
    app.router.add_get("/endless", endless)
    app.router.add_get("/gigabyte", gigabyte)
    app.router.add_get("/big-length", big_length)
    app.router.add_get("/redirect/{left}", redirect)
    app.router.add_get("/to-ftp", to_ftp)
    app.router.add_get("/reset", reset)
    app.router.add_get("/held", held)
    app.router.add_get("/robots.txt", robots_txt)
    app.router.add_get("/private/{name}", image)
    app.router.add_get("/opt-out/{directive}", opt_out)
    app.router.add_get("/fail-first/{code}/{id}", fail_first)
    app.router.add_get("/loop/{n}", loop_redirect)
    app.router.add_get("/to/{address}", redirect_to)
    with serve(app) as port:
        yield app[SEEN], port, app[HITS]


@pytest.fixture
def seen(server):
    return server[0]


@pytest.fixture
def hits(server):
    return server[2]


@pytest.fixture
def url(server):
    port = server[1]
    return lambda path: f"http://{HOST}:{port}{path}"


def config(**overrides) -> HttpConfig:
    # The server is on loopback, which the SSRF guard refuses: these tests opt in explicitly. No retries
    # unless a test asks, so failure tests stay fast and exact.
    fields = dict(total_timeout_s=2.0, max_bytes=STREAM_LIMIT, max_redirects=2, resolve=((HOST, "127.0.0.1"),),
                  allow_networks=("127.0.0.0/8",), retries=0, backoff_s=0.01)
    return HttpConfig(**(fields | overrides))


def fetch_one(target: str, **overrides):
    [result] = HttpFetcher(config(**overrides)).fetch_many([target])
    assert result.url == target
    return result


def test_image_is_fetched_with_headers(url):
    result = fetch_one(url("/image.png"))
    assert (result.ok, result.reason, result.status, result.error) == (True, None, 200, None)
    assert result.body == IMAGE
    assert result.headers["content-type"] == "image/png"
    assert result.headers["content-length"] == str(len(IMAGE))


@pytest.mark.parametrize("code", [404, 500])
def test_error_status_is_http_error(url, code):
    result = fetch_one(url(f"/status/{code}"))
    assert (result.ok, result.reason, result.status, result.error) == (False, HTTP_ERROR, code, f"HTTP {code}")
    assert result.body is None
    assert result.headers["content-type"].startswith("text/plain")


def test_deadline_covers_the_whole_body(url):
    start = time.monotonic()
    result = fetch_one(url("/trickle"), total_timeout_s=0.5)
    elapsed = time.monotonic() - start
    assert (result.reason, result.status, result.body) == (TIMEOUT, 200, None)
    assert result.headers["content-type"] == "image/png"
    assert result.error == "no complete response within 0.5 s"
    assert elapsed < 1.5


def test_connect_timeout():
    # A listener that never accepts, its backlog filled: Linux drops further SYNs, so connect() hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(address)
            with socket.socket() as probe:
                probe.settimeout(0.2)
                if probe.connect_ex(address) == 0:
                    pytest.skip("this kernel accepts connections beyond the backlog")
            start = time.monotonic()
            result = fetch_one(f"http://127.0.0.1:{address[1]}/x.png", connect_timeout_s=0.3)
            elapsed = time.monotonic() - start
        finally:
            for filler in fillers:
                filler.close()
    assert (result.reason, result.status, result.error) == (TIMEOUT, None, "no connection within 0.3 s")
    assert elapsed < 1.5


def test_body_streamed_past_the_cap_is_too_large(url):
    result = fetch_one(url("/endless"))
    assert (result.ok, result.reason, result.status) == (False, TOO_LARGE, 200)
    assert result.error == f"exceeded {STREAM_LIMIT} bytes"
    assert "content-length" not in result.headers
    assert result.body is None


def test_big_content_length_is_too_large_before_reading(url):
    result = fetch_one(url("/big-length"))
    assert (result.reason, result.status) == (TOO_LARGE, 200)
    assert result.error == f"Content-Length 1000000000 exceeds {STREAM_LIMIT} bytes"


def test_cap_is_inclusive(url):
    assert fetch_one(url("/image.png"), max_bytes=len(IMAGE)).ok
    assert fetch_one(url("/image.png"), max_bytes=len(IMAGE) - 1).reason == TOO_LARGE


def test_redirects_are_followed_up_to_the_limit(url):
    # /redirect/n takes n + 1 redirects to reach the image.
    result = fetch_one(url("/redirect/1"), max_redirects=2)
    assert (result.ok, result.status, result.body) == (True, 200, IMAGE)

    result = fetch_one(url("/redirect/2"), max_redirects=2)
    assert (result.ok, result.reason, result.status) == (False, HTTP_ERROR, 302)
    assert result.error == "more than 2 redirects"
    assert result.headers["location"] == "/image.png"  # the third redirect, the one not followed


def test_zero_redirects_follows_none(url):
    result = fetch_one(url("/redirect/0"), max_redirects=0)
    assert (result.reason, result.status, result.error) == (HTTP_ERROR, 302, "more than 0 redirects")


def test_redirect_to_another_scheme_is_http_error(url):
    result = fetch_one(url("/to-ftp"))
    assert result.reason == HTTP_ERROR
    assert "ftp://files.example.test/a.png" in result.error


def test_reset_and_refused_connections_are_http_errors(url):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    reset_result, refused = HttpFetcher(config()).fetch_many([url("/reset"), f"http://127.0.0.1:{closed_port}/x.png"])
    assert (reset_result.reason, reset_result.status) == (HTTP_ERROR, None)
    assert "ServerDisconnectedError" in reset_result.error
    assert (refused.reason, refused.status, refused.headers) == (HTTP_ERROR, None, {})
    assert f"127.0.0.1:{closed_port}" in refused.error


def test_resolve_maps_listed_hosts_and_fails_others_without_dns(url, monkeypatch):
    lookups = []
    real = asyncio.base_events.BaseEventLoop.getaddrinfo

    async def recording_getaddrinfo(self, host, *args, **kwargs):
        lookups.append(host)
        return await real(self, host, *args, **kwargs)

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "getaddrinfo", recording_getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: lookups.append(host) or [])
    monkeypatch.setattr(aiohttp.ThreadedResolver, "resolve", lambda self, host, *a, **k: lookups.append(host))
    mapped, unmapped = HttpFetcher(config()).fetch_many(
        [url("/image.png"), url("/image.png").replace(HOST, "elsewhere.example.test")]
    )
    assert mapped.ok and mapped.body == IMAGE
    assert (unmapped.reason, unmapped.status) == (HTTP_ERROR, None)
    assert unmapped.error == "cannot resolve host elsewhere.example.test: not in the resolve mapping"
    assert lookups == []


def test_empty_resolve_mapping_resolves_nothing(url):
    result = fetch_one(url("/image.png"), resolve=())
    assert result.reason == HTTP_ERROR
    assert "resolve" in result.error


def test_user_agent_is_sent(url, seen):
    seen.user_agents.clear()
    assert fetch_one(url("/image.png"), user_agent="danqing-test/1").ok
    assert seen.user_agents == ["danqing-test/1"]


@pytest.mark.parametrize(
    "bad, detail",
    [
        ("http://", "invalid URL"),
        ("ftp://x/y", "unsupported scheme"),
        ("not a url", "invalid URL"),
        ("", "invalid URL"),
        ("http://[::1", "invalid URL"),
    ],
)
def test_invalid_urls_are_http_errors(bad, detail):
    result = fetch_one(bad)
    assert (result.ok, result.reason, result.status, result.body, result.headers) == (
        False,
        HTTP_ERROR,
        None,
        None,
        {},
    )
    assert result.error.startswith(detail)


def test_results_keep_input_order(url):
    targets = [url("/status/404"), "not a url", url("/image.png"), url("/redirect/0"), url("/status/500")]
    results = HttpFetcher(config()).fetch_many(targets)
    assert [r.url for r in results] == targets
    assert [r.reason for r in results] == [HTTP_ERROR, HTTP_ERROR, None, None, HTTP_ERROR]
    assert [r.status for r in results] == [404, None, 200, 200, 500]


def test_many_urls_respect_per_host_limit_and_queueing_is_not_timed(url, seen):
    # 50 requests of 0.05 s, 4 at a time, take ~0.65 s: longer than the deadline, so this passes only if
    # a request's clock starts when it gets its slot, not when it is queued.
    seen.max_in_flight = 0
    targets = [url(f"/held?i={i}") for i in range(50)]
    results = HttpFetcher(config(per_host=4, concurrency=16, total_timeout_s=0.5)).fetch_many(targets)
    assert [r.error for r in results] == [None] * 50
    assert [r.body for r in results] == [str(i).encode() for i in range(50)]
    assert seen.max_in_flight > 1 and seen.max_in_flight <= 4


def test_fetch_many_inside_a_running_loop(url):
    async def caller():
        return HttpFetcher(config()).fetch_many([url("/image.png")])

    [result] = asyncio.run(caller())
    assert result.ok and result.body == IMAGE


def test_fetch_many_async(url):
    results = asyncio.run(HttpFetcher(config()).fetch_many_async([url("/image.png"), url("/status/404")]))
    assert [r.status for r in results] == [200, 404]


def test_empty_list():
    assert HttpFetcher(config()).fetch_many([]) == []


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        HttpConfig(per_host=0)
    with pytest.raises(ValueError):
        HttpFetcher(HttpConfig(resolve=(("a.test", "not-an-ip"),)))
    for bad in ({"retries": -1}, {"breaker_failures": -1}, {"per_host_rate": -1.0}, {"backoff_s": -0.1}):
        with pytest.raises(ValueError):
            HttpConfig(**bad)
    with pytest.raises(ValueError):
        HttpFetcher(HttpConfig(allow_networks=("10.0.0.0/33",)))  # a typo in the allow-list fails at once


# ---------------------------------------------------------------- SSRF guard


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.100.100.200", "168.63.129.16",
    "0.0.0.0", "224.0.0.1", "100.64.0.1", "::1", "::", "fe80::1", "fd00:ec2::254", "fc00::1", "ff02::1",
    "::ffff:10.0.0.1", "::ffff:127.0.0.1",
])
def test_guard_refuses_non_public_addresses(address):
    assert AddressGuard().why_blocked(address) is not None
    assert AddressGuard(enabled=False).why_blocked(address) is None


def test_guard_allows_public_addresses_and_the_allow_list():
    assert AddressGuard().why_blocked("93.184.216.34") is None
    assert AddressGuard().why_blocked("2606:2800:220:1:248:1893:25c8:1946") is None
    assert AddressGuard(allow=["10.1.0.0/16"]).why_blocked("10.1.2.3") is None
    assert AddressGuard(allow=["10.1.0.0/16"]).why_blocked("10.2.0.1") is not None


@pytest.mark.parametrize("target", ["http://10.0.0.1/a.jpg", "http://169.254.169.254/latest/meta-data/",
                                    "http://[::1]:9/a.png", "http://0.0.0.0:9/a.png"])
def test_literal_private_addresses_are_refused_without_connecting(target):
    start = time.monotonic()
    result = HttpFetcher(HttpConfig(connect_timeout_s=5, retries=2)).fetch_many([target])[0]
    assert (result.reason, result.status, result.attempts, result.transient) == (BLOCKED_ADDRESS, None, 0, False)
    assert time.monotonic() - start < 1  # 10.0.0.1 is unroutable here: dialling it would hang until the timeout


def test_hostname_resolving_to_a_private_address_is_refused():
    start = time.monotonic()
    result = HttpFetcher(HttpConfig(resolve=(("intranet.example.test", "10.0.0.1"),), connect_timeout_s=5)
                         ).fetch_many(["http://intranet.example.test/a.jpg"])[0]
    assert (result.reason, result.attempts) == (BLOCKED_ADDRESS, 0)
    assert "intranet.example.test resolves to 10.0.0.1 is a private address" == result.error
    assert time.monotonic() - start < 1


def test_localhost_resolves_to_loopback_and_is_refused(url, hits):
    """Real resolution (no mapping): `localhost` answers 127.0.0.1 / ::1, which the guard refuses before dialling."""
    before = dict(hits)
    result = fetch_one(url("/opt-out/none").replace(HOST, "localhost"), resolve=None, allow_networks=())
    assert (result.reason, result.status, result.attempts) == (BLOCKED_ADDRESS, None, 0)
    assert result.error.startswith("localhost resolves to ") and "loopback" in result.error
    assert hits == before  # the server never saw a request


def test_loopback_needs_the_allow_list(url):
    # The same server as every other test, but without the opt-in: refused before any request.
    assert fetch_one(url("/image.png"), allow_networks=()).reason == BLOCKED_ADDRESS


def test_redirect_to_a_private_address_is_refused(url):
    result = fetch_one(url("/to/10.0.0.1"))
    assert (result.reason, result.status) == (BLOCKED_ADDRESS, 302)
    assert result.error == "10.0.0.1 is a private address"


def test_redirect_to_loopback_is_refused_without_connecting():
    """A server on 127.0.0.2 (the only allowed address) redirects to 127.0.0.1, where a listener waits."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        target = f"127.0.0.1:{listener.getsockname()[1]}"
        app = web.Application()
        app.router.add_get("/to/{address}", redirect_to)
        with serve(app, "127.0.0.2") as port:
            result = HttpFetcher(HttpConfig(allow_networks=("127.0.0.2/32",), robots=False)).fetch_many(
                [f"http://127.0.0.2:{port}/to/{target}"])[0]
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody ever connected
    assert (result.reason, result.status, result.error) == (BLOCKED_ADDRESS, 302, "127.0.0.1 is a loopback address")


def test_redirect_loop_is_http_error(url):
    result = fetch_one(url("/loop/0"), max_redirects=5)
    assert (result.reason, result.status) == (HTTP_ERROR, 302)
    assert result.error.startswith("redirect loop at ")


# ---------------------------------------------------------------- robots.txt and opt-out


def test_robots_disallow_is_refused_and_fetched_once_per_host(url, hits):
    agent = f"robots-test-{time.monotonic_ns()}/1"  # caches are per process and agent: this one starts empty
    before = hits["/robots.txt"]
    results = HttpFetcher(config(user_agent=agent)).fetch_many(
        [url("/private/a.png"), url("/image.png"), url("/private/b.png")])
    assert [r.reason for r in results] == [ROBOTS, None, ROBOTS]
    assert results[0].attempts == 0 and not results[0].transient
    assert HttpFetcher(config(user_agent=agent)).fetch_many([url("/private/c.png")])[0].reason == ROBOTS
    assert hits["/robots.txt"] - before == 1  # one host, one robots.txt, for every fetcher of the process
    assert fetch_one(url("/private/a.png"), robots=False).ok  # it can be turned off
    other = fetch_one(url("/image.png"), user_agent="otherbot/2.0")  # the group for otherbot disallows all
    assert other.reason == ROBOTS


@pytest.mark.parametrize("directive, reason", [
    ("noai", OPT_OUT), ("noimageai", OPT_OUT), ("noindex", OPT_OUT), ("noimageindex", OPT_OUT),
    ("nofollow,_noarchive", None), ("otherbot:_noai", None), ("danqing:_noimageai", OPT_OUT),
])
def test_x_robots_tag_opt_out(url, directive, reason):
    assert fetch_one(url(f"/opt-out/{directive}")).reason == reason
    if reason:
        assert fetch_one(url(f"/opt-out/{directive}"), opt_out=False).ok


def test_an_error_page_saying_noindex_is_an_http_error(url):
    result = fetch_one(url("/opt-out/noindex?status=404"))
    assert (result.reason, result.status) == (HTTP_ERROR, 404)


def test_robots_txt_redirect_to_a_private_address_is_not_followed():
    """A host whose robots.txt redirects to 10.0.0.1: the guard stops that hop; the image itself is fetched."""
    async def robots_away(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://10.0.0.1/robots.txt")

    app = web.Application()
    app.router.add_get("/robots.txt", robots_away)
    app.router.add_get("/image.png", image)
    app[SEEN] = Seen()
    with serve(app, "127.0.0.3") as port:
        start = time.monotonic()
        result = HttpFetcher(HttpConfig(allow_networks=("127.0.0.3/32",), connect_timeout_s=5,
                                        user_agent=f"robots-redirect-{time.monotonic_ns()}/1")).fetch_many(
            [f"http://127.0.0.3:{port}/image.png"])[0]
    assert result.ok and time.monotonic() - start < 2


def test_opted_out_parses_scoped_groups():
    assert opted_out({"x-robots-tag": "googlebot: noindex, noai"}, "danqing") is None  # noai scoped to googlebot
    assert opted_out({"x-robots-tag": "max-snippet: 5, noimageai"}, "danqing") == "noimageai"
    assert opted_out({}, "danqing") is None


# ---------------------------------------------------------------- retries, backoff, circuit breaker, rate


def test_503_then_200_is_retried(url, hits):
    result = fetch_one(url("/fail-first/503/a"), retries=2)
    assert (result.ok, result.attempts, result.status) == (True, 2, 200)
    assert hits["/fail-first/503/a"] == 2


def test_429_retry_after_is_honoured(url, hits):
    start = time.monotonic()
    result = fetch_one(url("/fail-first/429/ra-b"), retries=1)
    assert (result.ok, result.attempts) == (True, 2)
    assert time.monotonic() - start >= 1.0  # Retry-After: 1, far above the 0.01 s backoff
    too_long = fetch_one(url("/fail-first/429/ra-c"), retries=1, max_retry_after_s=0.5)
    assert (too_long.reason, too_long.status, too_long.attempts, too_long.transient) == (HTTP_ERROR, 429, 1, True)


@pytest.mark.parametrize("code, transient", [(404, False), (403, False), (500, True), (503, True), (429, True)])
def test_only_transient_failures_are_retried(url, hits, code, transient):
    path = f"/fail-first/{code}/always-{code}"
    result = fetch_one(url(path), retries=2)
    assert (result.reason, result.status, result.transient) == (HTTP_ERROR, code, transient)
    assert result.attempts == hits[path] == (3 if transient else 1)


def test_slow_drip_past_the_deadline_is_retried_then_timeout(url):
    result = fetch_one(url("/trickle"), total_timeout_s=0.3, retries=1)
    assert (result.reason, result.attempts, result.transient) == (TIMEOUT, 2, True)


def test_circuit_breaker_stops_asking_a_failing_host(url, hits):
    targets = [url(f"/fail-first/500/always-cb{i}") for i in range(10)]
    results = HttpFetcher(config(per_host=1, retries=0, breaker_failures=3)).fetch_many(targets)
    assert [r.reason for r in results] == [HTTP_ERROR] * 10
    assert sum(hits[f"/fail-first/500/always-cb{i}"] for i in range(10)) == 3
    assert [r.attempts for r in results] == [1, 1, 1] + [0] * 7
    assert results[-1].error.startswith("circuit open after 3 failures in a row") and results[-1].transient


def test_per_host_rate_limit(url):
    start = time.monotonic()
    results = HttpFetcher(config(per_host_rate=20)).fetch_many([url(f"/held?i={i}") for i in range(11)])
    assert all(r.ok for r in results)
    assert time.monotonic() - start >= 0.45  # 11 starts at 20/s span 0.5 s


def test_dns_is_looked_up_once_per_host(url, monkeypatch):
    lookups = []
    real = aiohttp.ThreadedResolver.resolve

    async def recording_resolve(self, host, *args, **kwargs):
        lookups.append(host.rstrip("."))
        return await real(self, host, *args, **kwargs)

    monkeypatch.setattr(aiohttp.ThreadedResolver, "resolve", recording_resolve)
    fetcher = HttpFetcher(config(resolve=None, allow_networks=("127.0.0.0/8", "::1/128"),
                                 user_agent=f"dns-test-{time.monotonic_ns()}/1"))  # a cache of its own
    local = url("/image.png").replace(HOST, "localhost")
    assert all(r.ok for r in fetcher.fetch_many([local] * 5))
    assert all(r.ok for r in fetcher.fetch_many([local]))  # a later call of the same fetcher reuses the cache
    assert lookups == ["localhost"]


def test_gigabyte_body_is_aborted_at_the_cap(url):
    start = time.monotonic()
    result = fetch_one(url("/gigabyte"), max_bytes=1_000_000)
    assert (result.reason, result.status, result.body) == (TOO_LARGE, 200, None)
    assert time.monotonic() - start < 2


def test_memory_stays_bounded_while_a_gigabyte_streams(url):
    """A fresh process asks for the 1 GB body under the default 20 MB cap: its peak RSS grows by about the cap."""
    # The peak is reset first (clear_refs 5), so the imports' own high-water mark does not hide the fetch's.
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from tasks.io.http import HttpConfig, HttpFetcher\n"
        "def kb(name):\n"
        "    return next(int(x.split()[1]) for x in Path('/proc/self/status').read_text().splitlines()"
        " if x.startswith(name))\n"
        "f = HttpFetcher(HttpConfig(resolve=((sys.argv[2], '127.0.0.1'),), allow_networks=('127.0.0.0/8',)))\n"
        "Path('/proc/self/clear_refs').write_text('5')\n"
        "before = kb('VmRSS:')\n"
        "[r] = f.fetch_many([sys.argv[1]])\n"
        "print(json.dumps({'reason': r.reason, 'growth_mb': (kb('VmHWM:') - before) / 1024}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code, url("/gigabyte"), HOST], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["reason"] == TOO_LARGE
    print(f"peak RSS growth while a 1 GB body streams: {out['growth_mb']:.1f} MB")
    assert out["growth_mb"] < 60  # measured ~21 MB: the 20 MB cap plus a chunk, never the gigabyte
