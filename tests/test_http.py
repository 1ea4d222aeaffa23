"""Tests for tasks.io.http against a real aiohttp server on 127.0.0.1."""

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from tasks.io.http import HTTP_ERROR, TIMEOUT, TOO_LARGE, HttpConfig, HttpFetcher

HOST = "images.example.test"  # only reachable through the `resolve` mapping, so no test needs DNS
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
STREAM_LIMIT = 10_000  # max_bytes for the size tests; the streaming routes send far more


@dataclass
class Seen:
    user_agents: list[str | None] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


SEEN = web.AppKey("seen", Seen)


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
    app.router.add_get("/image.png", image)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/trickle", trickle)
    app.router.add_get("/endless", endless)
    app.router.add_get("/big-length", big_length)
    app.router.add_get("/redirect/{left}", redirect)
    app.router.add_get("/to-ftp", to_ftp)
    app.router.add_get("/reset", reset)
    app.router.add_get("/held", held)

    # Handlers the client walked away from are cancelled, so teardown does not wait on their sleeps.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> None:
        await runner.setup()
        await web.SockSite(runner, sock).start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield app[SEEN], sock.getsockname()[1]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture
def seen(server):
    return server[0]


@pytest.fixture
def url(server):
    port = server[1]
    return lambda path: f"http://{HOST}:{port}{path}"


def config(**overrides) -> HttpConfig:
    fields = dict(total_timeout_s=2.0, max_bytes=STREAM_LIMIT, max_redirects=2, resolve=((HOST, "127.0.0.1"),))
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
