"""A real aiohttp server on a loopback address, run on its own loop and thread, for fetcher tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator

from aiohttp import web


@contextlib.contextmanager
def serve(app: web.Application, host: str = "127.0.0.1") -> Iterator[int]:
    """Serve `app` on `host` (any 127.0.0.0/8 address) and yield its port; the fetcher may block this thread."""
    # Handlers the client walked away from are cancelled, so teardown does not wait on their sleeps.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> None:
        await runner.setup()
        await web.SockSite(runner, sock).start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield sock.getsockname()[1]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def gigabyte(request: web.Request) -> web.StreamResponse:
    """1 GB in 64 KiB chunks, generated as sent: a fetcher must walk away at its cap, not read it all."""
    resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    chunk = b"\xff" * 65536
    for _ in range(1_000_000_000 // len(chunk)):
        await resp.write(chunk)
    return resp
