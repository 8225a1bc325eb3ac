"""A loopback HTTP proxy in front of the S3 store that counts what clients send it: requests by method, and
the payload bytes of their bodies (what a PUT or an upload part stores; listings count as LIST), so a test or benchmark measures the
bytes a job writes to the store from the outside, whatever process sends them. Point AWS_ENDPOINT_URL at
`proxy.endpoint`; requests pass through unchanged (SigV4 signs the Host header, which stays the proxy's own
and reaches the store as sent)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse


@dataclass
class S3Traffic:
    requests: Counter = field(default_factory=Counter)  # by HTTP method
    body_bytes: Counter = field(default_factory=Counter)  # payload bytes, by HTTP method

    @property
    def bytes_sent(self) -> int:
        return sum(self.body_bytes.values())


class CountingProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1"):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.host = host
        self.port = 0
        self.traffic = S3Traffic()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, self.host, 0), self._loop
        ).result(10)
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def reset(self) -> S3Traffic:
        with self._lock:
            taken, self.traffic = self.traffic, S3Traffic()
        return taken

    def _count(self, method: str, body: int) -> None:
        with self._lock:
            self.traffic.requests[method] += 1
            self.traffic.body_bytes[method] += body

    async def _client(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        back = asyncio.ensure_future(self._pipe(up_reader, client_writer))
        # A connection ends when either side closes it, whatever it was doing then.
        closed = (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError)
        try:
            with contextlib.suppress(*closed):
                await self._requests(client_reader, up_writer)
        finally:
            up_writer.close()
            back.cancel()
            client_writer.close()

    async def _requests(self, client_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        """Forward the client's requests one after another, counting each."""
        while True:
            head = await client_reader.readuntil(b"\r\n\r\n")  # at most the reader's 64 KiB limit
            lines = head.decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ", 2)[:2]
            if method == "GET" and ("list-type=" in target or "uploads" in target):
                method = "LIST"
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            up_writer.write(head)
            if headers.get("transfer-encoding", "").lower() == "chunked":
                payload = await self._forward_chunked(client_reader, up_writer)
            else:
                length = int(headers.get("content-length", "0"))
                await self._forward(client_reader, up_writer, length)
                payload = length
            # aws-chunked bodies carry signatures and trailers around the data; this header says the data.
            decoded = headers.get("x-amz-decoded-content-length")
            self._count(method, int(decoded) if decoded is not None else payload)
            await up_writer.drain()

    @staticmethod
    async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, length: int) -> None:
        while length > 0:
            data = await reader.read(min(length, 1 << 16))
            if not data:
                raise asyncio.IncompleteReadError(b"", length)
            writer.write(data)
            length -= len(data)
            await writer.drain()

    async def _forward_chunked(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            writer.write(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    line = await reader.readuntil(b"\r\n")
                    writer.write(line)
                    if line == b"\r\n":
                        return total
            await self._forward(reader, writer, size + 2)
            total += size

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await reader.read(1 << 16):
                    writer.write(data)
                    await writer.drain()
        finally:
            writer.close()
