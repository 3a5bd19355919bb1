"""httpcore's network layer on plain asyncio streams, for LlamaClient's connection pool.

Why: httpcore's own backend runs every connect, read and write through anyio (a cancel scope
for its timeout, an exception map, anyio's stream classes), and httpx's transport wraps
httpcore's pool in its own request, response and exception models. One request costs less
without both: RESULTS §1's microbench (one chat request to the fake llama-server, median)
measured httpx's transport 1.89 ms, httpcore alone 1.62–1.81, httpcore on a plain-asyncio
stream 1.40–1.59, `http.client` 1.07–1.16. LlamaClient.chat on this stream against the one on
httpx's transport, interleaved, 300 requests each, two runs: 1.42 / 1.39 ms against
1.75 / 1.63 back to back, 2.33 / 2.36 against 2.74 / 2.80 with the latency bench's 50 ms pause
before each (the client's CPU 0.74 against 1.00 ms a request, 1.43 against 1.86 paused).

The stream holds what httpcore writes until it first reads: httpcore writes the request line
and headers, then the body, then reads the answer, so the request leaves in one `send` instead
of two (TCP_NODELAY would send each at once). That saves the client 0.026–0.031 ms of CPU a
request, the median time unchanged (1000 requests interleaved, two runs: 1.367 / 1.275 ms
against 1.364 / 1.253 ms): with two sends the server starts on the headers while the body
follows.

Per-operation timeouts are not applied: LlamaClient never sets them (its requests carry no
"timeout" extension, so httpcore passes None), and it bounds each whole exchange, connect
included, with one `asyncio.timeout`, which cancels whichever read, write or connect is
waiting. `local_address` and `socket_options` are likewise never set by its pool.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Iterable
from typing import Any

import httpcore

__all__ = ["AsyncioBackend"]


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._unsent: list[bytes] = []

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._unsent:
            # The transport sends what it can now and buffers the rest until the socket drains
            # (a request is a few kB); a lost connection shows in the read below.
            self._writer.write(b"".join(self._unsent))
            self._unsent.clear()
        try:
            return await self._reader.read(max_bytes)  # b"" at EOF
        except OSError as exc:
            raise httpcore.ReadError(repr(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._unsent.append(buffer)

    async def aclose(self) -> None:
        self._writer.close()

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # Asked of an idle kept-alive connection before it is reused: readable means the
            # server hung up (or sent what nobody asked for), so the pool opens another.
            sock = self._writer.get_extra_info("socket")
            if sock is None or sock.fileno() < 0 or self._reader.at_eof():
                return True
            poll = select.poll()
            poll.register(sock.fileno(), select.POLLIN)
            return bool(poll.poll(0))
        return self._writer.get_extra_info(info)


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """TCP connections as asyncio streams (plain HTTP: llama-server is on loopback or a LAN)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            # asyncio sets TCP_NODELAY on every TCP transport it makes.
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(repr(exc)) from exc
        return _Stream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
