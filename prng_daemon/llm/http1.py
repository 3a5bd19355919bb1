"""LlamaClient's HTTP/1.1: a keep-alive connection pool of asyncio protocols, answers parsed by h11.

Why not httpcore (which the client used before, on asyncio streams of ours) or httpx: for the
one thing the client does (a request, its answer read whole, on a kept-alive loopback
connection) httpcore's pool takes three anyio locks a request, each yielding to the loop once,
and builds its own request, response and stream objects around h11, its parser. This module
keeps h11 and drops the rest. RESULTS §1's microbench shape (one chat request to the fake
llama-server in another process, medians of 300, interleaved, two runs), back to back / with the
latency bench's 50 ms pause before each: LlamaClient.chat on httpcore 1.48 / 1.47 ms and
2.41 / 2.27 ms, on this pool 1.16 / 1.14 ms and 1.89 / 1.79 ms (`http.client` 1.05 / 1.06 and
1.59 / 1.50); the client's CPU a request 0.79–0.82 against 0.42–0.43 ms, 1.37–1.53 against
0.83–0.92 paused. bench_latency, 150 files, interleaved with the httpcore tree: daemon 4.81
against 5.42 ms (1.87× against 2.11× the floor), 5.42 against 6.01 (2.00× against 2.22×).

- The request leaves in one write, its bytes formatted here: h11's events cost 21 µs a
  request to build them, formatting 1.5 µs. h11 is still told the request's method and target
  (a cached event, 13 µs), all that the answer's framing depends on, and parses the answer
  (42 µs): status line and headers (at most 16 KiB, h11's bound), a body by Content-Length,
  chunked, or until the server closes.
- The answer is parsed as it arrives, in the protocol's data_received: no stream reader, and the
  waiting request wakes once, when the answer is complete.
- A body over `max_body` bytes (64 MiB) ends the exchange with AnswerTooLarge: a broken or
  hostile server cannot make the daemon buffer gigabytes (httpcore had no bound).
- Idle connections are reused last-in first-out, at most `max_idle` kept (httpx's default),
  none idle longer than `keepalive_expiry`, 4 s: llama-server (cpp-httplib) closes a
  connection idle for 5 s, and a request sent on one at 4.99 s could meet that close on the
  way and fail for nothing (httpx's 5 s had that race). One the server has closed, or sent
  unasked bytes on, is
  readable while idle: it is closed and the request goes out on a fresh one. A connection whose
  exchange failed or was cancelled (the client's deadline on the whole exchange) is closed,
  never reused: its answer may still arrive and would be read as the next request's.
- No bound on connections open at once (httpcore's was 100): the daemon's LLM slots (the
  servers' `parallel`, in all) bound its requests in flight.
"""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import Sequence
from typing import NamedTuple, cast

import h11

__all__ = ["AnswerTooLarge", "ConnectionPool", "NoAnswer", "Response"]

MAX_BODY = 64 * 1024 * 1024
"""Bytes of answer body read at most (llama-server's answers are kilobytes)."""

_END = h11.EndOfMessage()


class NoAnswer(Exception):
    """No HTTP answer: the server unreachable, the connection reset or closed mid-answer, or bytes
    that are not an HTTP response."""


class AnswerTooLarge(Exception):
    """The answer's body is over the pool's `max_body` bytes."""


class Response(NamedTuple):
    status: int
    content: bytes


class _Connection(asyncio.Protocol):
    """One TCP connection; one exchange at a time (`exchange`)."""

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self._transport: asyncio.Transport | None = None
        self._poll = select.poll()
        self._answer: asyncio.Future[Response] | None = None
        self._parser = h11.Connection(h11.CLIENT)
        self._status = 0
        self._body: list[bytes] = []
        self._size = 0
        self.closed = False
        """The connection is closed or closing; it is never used again."""
        self.reusable = False
        """The last answer was read whole and the server keeps the connection open."""
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._poll.register(transport.get_extra_info("socket").fileno(), select.POLLIN)

    def exchange(self, told: h11.Request, data: bytes) -> asyncio.Future[Response]:
        """Send `data` (a whole request, which h11 is `told` of) and return the answer's future."""
        assert self._transport is not None
        # A fresh parser a request costs 1 µs, start_next_cycle() about as much, and a fresh one
        # carries nothing over from an exchange cut short.
        parser = self._parser = h11.Connection(h11.CLIENT)
        parser.send(told)
        parser.send(_END)
        self._status = self._size = 0
        self._body = []
        self.reusable = False
        answer = self._answer = asyncio.get_running_loop().create_future()
        self._transport.write(data)
        return answer

    def readable(self) -> bool:
        """Asked of an idle connection: readable means the server hung up (or sent what nobody
        asked for). The loop may not have run since, so its callbacks cannot be relied on."""
        return self.closed or bool(self._poll.poll(0))

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        answer = self._answer
        if answer is None or answer.done():
            self.close()  # bytes nobody asked for: the connection's state is unknown
            return
        parser = self._parser
        try:
            parser.receive_data(data)
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    return
                kind = type(event)
                if kind is h11.Data:
                    chunk = cast(h11.Data, event).data
                    self._size += len(chunk)
                    if self._size > self._max_body:
                        raise AnswerTooLarge(f"answer body over {self._max_body} bytes")
                    self._body.append(chunk)
                elif kind is h11.Response:
                    self._status = cast(h11.Response, event).status_code
                elif kind is h11.EndOfMessage:
                    self.reusable = (
                        parser.our_state is h11.DONE
                        and parser.their_state is h11.DONE
                        and not parser.trailing_data[0]
                    )
                    answer.set_result(Response(self._status, b"".join(self._body)))
                    return
                elif kind is h11.ConnectionClosed:
                    raise NoAnswer("connection closed before an answer")
                # An InformationalResponse (1xx): the answer follows.
        except h11.RemoteProtocolError as exc:
            answer.set_exception(NoAnswer(f"not an HTTP answer: {exc}"))
        except (NoAnswer, AnswerTooLarge) as exc:
            answer.set_exception(exc)
        self.close()

    def eof_received(self) -> bool:
        self.data_received(b"")  # h11 reads b"" as the end; an answer read to the end completes
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(NoAnswer(repr(exc) if exc else "connection closed"))


class ConnectionPool:
    """Kept-alive connections to one server (plain HTTP: llama-server is on loopback or a LAN);
    `headers` go with every request. Close with `aclose()`."""

    def __init__(
        self,
        host: str,
        port: int,
        headers: Sequence[tuple[bytes, bytes]],
        *,
        max_body: int = MAX_BODY,
        max_idle: int = 20,
        keepalive_expiry: float = 4.0,
    ) -> None:
        self._host = host
        self._port = port
        self._host_header = next(value for name, value in headers if name.lower() == b"host")
        self._head = b"".join(b"%s: %s\r\n" % header for header in headers)
        self._max_body = max_body
        self._max_idle = max_idle
        self._expiry = keepalive_expiry
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._told: dict[tuple[bytes, bytes], h11.Request] = {}

    async def request(self, method: bytes, target: bytes, body: bytes | None = None) -> Response:
        """One exchange, the answer read whole; NoAnswer or AnswerTooLarge if there is none.
        Cancelling it closes its connection."""
        told = self._told.get((method, target))
        if told is None:
            told = self._told[method, target] = h11.Request(
                method=method, target=target, headers=[(b"Host", self._host_header)]
            )
        data = b"%s %s HTTP/1.1\r\n%s" % (method, target, self._head)
        if body is None:
            data += b"\r\n"
        else:
            data += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        connection = self._idle_connection() or await self._connect()
        try:
            response = await connection.exchange(told, data)
        except BaseException:
            self._close(connection)
            raise
        if connection.reusable and not connection.closed and len(self._idle) < self._max_idle:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            self._close(connection)
        return response

    def _idle_connection(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if now - connection.idle_since < self._expiry and not connection.readable():
                return connection
            self._close(connection)
        return None

    async def _connect(self) -> _Connection:
        max_body = self._max_body
        try:
            # asyncio sets TCP_NODELAY on every TCP transport it makes.
            _, connection = await asyncio.get_running_loop().create_connection(
                lambda: _Connection(max_body), self._host, self._port
            )
        except OSError as exc:
            raise NoAnswer(repr(exc)) from None
        self._open.add(connection)
        return connection

    def _close(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)

    async def aclose(self) -> None:
        """Close every connection, idle or in use."""
        for connection in list(self._open):
            self._close(connection)
        self._idle.clear()
