"""A real HTTP server on loopback for downloader tests: an aiohttp.web app in a background thread whose
endpoints misbehave on purpose (errors, retries, slow drips, redirects, oversize and cut-off bodies),
and which records every request so tests can count attempts and TCP connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import io
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web
from PIL import Image


def make_jpeg(size: tuple[int, int] = (32, 24), color: tuple[int, int, int] = (200, 40, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


class HttpTestServer:
    """Serves on http://127.0.0.1:<port>. `hits[key]` and `hit_times[key]` record requests per endpoint key;
    `connections` the client (host, port) pairs seen, one per TCP connection; `blobs[name]` is served at
    /blob/{name}."""

    def __init__(self) -> None:
        self.jpeg = make_jpeg()
        self.hits: dict[str, int] = defaultdict(int)
        self.hit_times: dict[str, list[float]] = defaultdict(list)
        self.connections: set[tuple[str, int]] = set()
        self.requests_served = 0
        self.blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-test-server", daemon=True)
        self.port = 0

    # --- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> HttpTestServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/image.jpg", self.image)
        app.router.add_get("/echo/{id}", self.echo)
        app.router.add_get("/status/{code}", self.status)
        app.router.add_get("/flaky/{key}", self.flaky)
        app.router.add_get("/slow-drip", self.slow_drip)
        app.router.add_get("/loop/{name}", self.redirect_loop)
        app.router.add_get("/chain/{n}", self.redirect_chain)
        app.router.add_get("/redirect", self.redirect_to)
        app.router.add_get("/big", self.big)
        app.router.add_get("/robots", self.robots)
        app.router.add_get("/reset-mid-body", self.reset_mid_body)
        app.router.add_get("/empty", self.empty)
        app.router.add_get("/blob/{name}", self.blob)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def reset_counters(self) -> None:
        with self._lock:
            self.connections.clear()
            self.requests_served = 0

    def _record(self, request: web.Request, key: str) -> int:
        with self._lock:
            self.hits[key] += 1
            self.hit_times[key].append(time.monotonic())
            self.requests_served += 1
            peer = request.transport.get_extra_info("peername") if request.transport else None
            if peer is not None:
                self.connections.add((peer[0], peer[1]))
            return self.hits[key]

    # --- endpoints -------------------------------------------------------------------------------------
    async def image(self, request: web.Request) -> web.Response:
        self._record(request, "image")
        return web.Response(body=self.jpeg, content_type="image/jpeg")

    async def echo(self, request: web.Request) -> web.Response:
        ident = request.match_info["id"]
        self._record(request, f"echo/{ident}")
        return web.Response(body=f"image-{ident}".encode(), content_type="image/jpeg")

    async def status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        self._record(request, f"status/{code}")
        return web.Response(status=code, text=f"status {code}")

    async def flaky(self, request: web.Request) -> web.Response:
        """Fails `fail` times with `code` (and Retry-After if given), then serves the image."""
        count = self._record(request, f"flaky/{request.match_info['key']}")
        if count <= int(request.query.get("fail", "1")):
            headers = {}
            if "retry_after" in request.query:
                headers["Retry-After"] = request.query["retry_after"]
            return web.Response(
                status=int(request.query.get("code", "500")), headers=headers, text="try later"
            )
        return web.Response(body=self.jpeg, content_type="image/jpeg")

    async def slow_drip(self, request: web.Request) -> web.StreamResponse:
        self._record(request, "slow-drip")
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": "60"})
        await response.prepare(request)
        try:
            for _ in range(60):
                await response.write(b"x")
                await asyncio.sleep(1.0)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return response

    async def redirect_loop(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._record(request, f"loop/{name}")
        raise web.HTTPFound(f"/loop/{'b' if name == 'a' else 'a'}")

    async def redirect_chain(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        self._record(request, f"chain/{n}")
        if n > 0:
            raise web.HTTPMovedPermanently(f"/chain/{n - 1}")
        return web.Response(body=self.jpeg, content_type="image/jpeg")

    async def redirect_to(self, request: web.Request) -> web.Response:
        self._record(request, "redirect")
        raise web.HTTPFound(request.query["location"])

    async def big(self, request: web.Request) -> web.StreamResponse:
        """`size` bytes, announced by Content-Length unless `chunked=1`."""
        self._record(request, "big")
        size = int(request.query["size"])
        if request.query.get("chunked") == "1":
            response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            try:
                for start in range(0, size, 64 * 1024):
                    await response.write(b"x" * min(64 * 1024, size - start))
                await response.write_eof()
            except ConnectionError:
                pass
            return response
        return web.Response(body=b"x" * size, content_type="image/jpeg")

    async def robots(self, request: web.Request) -> web.Response:
        self._record(request, "robots")
        headers = [("X-Robots-Tag", tag) for tag in request.query.getall("tag", [])]
        response = web.Response(body=self.jpeg, content_type="image/jpeg")
        for name, value in headers:
            response.headers.add(name, value)
        return response

    async def reset_mid_body(self, request: web.Request) -> web.StreamResponse:
        self._record(request, "reset-mid-body")
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": "100000"})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def empty(self, request: web.Request) -> web.Response:
        self._record(request, "empty")
        return web.Response(body=b"", content_type="image/jpeg")

    async def blob(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._record(request, f"blob/{name}")
        if name not in self.blobs:
            raise web.HTTPNotFound()
        return web.Response(body=self.blobs[name], content_type="application/octet-stream")


class _QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass  # a test's output is what it checks, not one line per request


@contextlib.contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serve a folder's files over HTTP on loopback (threaded, like a static site); yields the base URL."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietFileHandler, directory=root)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
