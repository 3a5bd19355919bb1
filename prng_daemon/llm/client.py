"""Clients for llama-server on httpx: the daemon's async one and the agents' blocking one. Both
keep connections alive under the server's idle close, cap the answer, keep one deadline on the
whole request, and raise only our errors (docs/llm-client.md)."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Unpack

import httpx

# Not used here: installed, it is found in sys.modules by httpcore, which imports it several
# times a request and, without it, searches sys.path each time (pyproject.toml says more).
import sniffio  # noqa: F401

from ..errors import LLMBadAnswer, LLMError, LLMUnavailable
from . import api
from .api import Answer, Completion, CompletionOptions, Health, TokenProbability, TopLogprob

# What the clients answer with, from api.py, is theirs to name too.
__all__ = [
    "BlockingLlamaClient",
    "Completion",
    "CompletionOptions",
    "Health",
    "LlamaClient",
    "TokenProbability",
    "TopLogprob",
]

MAX_BODY = 64 * 1024 * 1024
"""Bytes of answer body read at most (llama-server's answers are kilobytes): a broken server
cannot make the daemon buffer gigabytes."""

KEEPALIVE_EXPIRY = 4.0
"""Seconds an idle connection is kept. llama-server (cpp-httplib) closes one idle for 5 s; a
request sent on it at 4.99 s could meet that close on the way and fail for nothing (httpx's
default expiry is that same 5 s)."""

_LIMITS = httpx.Limits(
    # No bound of the pool's own (httpx's is 100, then a wait): the daemon's LLM slots (the
    # servers' `parallel`) bound its requests in flight.
    max_connections=None,
    max_keepalive_connections=20,
    keepalive_expiry=KEEPALIVE_EXPIRY,
)


class _TooLarge(Exception):
    pass


class _Capped:
    """An answer's body as it streams in, refused past MAX_BODY bytes."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0

    def add(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > MAX_BODY:
            raise _TooLarge
        self._chunks.append(chunk)

    def content(self) -> bytes:
        return b"".join(self._chunks)


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class _Llama:
    """What both clients share: the server's address, headers and httpx settings, and httpx's
    errors (and the deadline's) turned into ours."""

    def __init__(self, base_url: str, timeout: float, api_key: str | None) -> None:
        self.base_url = base_url
        self.timeout = timeout
        """Seconds for a whole request, from connecting to the last byte of the answer."""
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # trust_env=False: an operator's http_proxy must not send loopback requests elsewhere.
        # httpx's timeouts are per phase (connect, each read, ...): the whole request's
        # deadline is each client's own.
        self._urls: dict[str, httpx.URL] = {}
        self._http_options: dict[str, Any] = {
            "headers": headers,
            "timeout": timeout,
            "limits": _LIMITS,
            "trust_env": False,
            # The config's URLs are plain HTTP (ServerConfig.url): no TLS context to build,
            # which costs 40-140 ms a client (the CA bundle) and an agent makes two.
            "verify": not base_url.startswith("http://"),
        }

    def _where(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _url(self, path: str) -> httpx.URL:
        """`path` on the server, parsed once: httpx parses a URL given as text (and merges it
        with a base URL) on every request, 0.1 ms of a request's 1.1 ms of CPU."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self._where(path))
        return url

    @contextmanager
    def _answering(self, path: str) -> Iterator[None]:
        where = self._where(path)
        try:
            yield
        except (TimeoutError, httpx.TimeoutException):
            raise LLMUnavailable(f"{where}: no complete answer within {self.timeout:g}s") from None
        except _TooLarge:
            raise LLMBadAnswer(f"{where}: answer body over {MAX_BODY} bytes") from None
        except httpx.TransportError as exc:  # refused, reset, closed mid-answer, not HTTP
            raise LLMUnavailable(f"{where}: unreachable: {_why(exc)}") from None
        except httpx.HTTPError as exc:  # an answer httpx cannot decode
            raise LLMBadAnswer(f"{where}: {_why(exc)}") from None


class LlamaClient(_Llama):
    """One llama-server, for the daemon: one `httpx.AsyncClient` (its own pool of kept-alive
    connections, its own key); close it with `aclose()`. `transport` replaces httpx's (tests)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, timeout, api_key)
        self._http = httpx.AsyncClient(transport=transport, **self._http_options)

    async def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> Answer:
        """One exchange, its answer read whole, within `timeout` seconds in all: one deadline on
        the whole exchange, because a server that drips one byte a second never trips a
        per-read timeout and would hold a decision slot for ever. Cancelled (the deadline),
        httpx closes the connection: its late answer is never read as the next request's."""
        content = None if body is None else _json(body)
        with self._answering(path):
            async with (
                asyncio.timeout(self.timeout),
                self._http.stream(method, self._url(path), content=content) as response,
            ):
                capped = _Capped()
                async for chunk in response.aiter_bytes():
                    capped.add(chunk)
                return Answer(response.status_code, capped.content())

    async def health(self) -> Health:
        try:
            return api.health(await self._send("GET", "/health"))
        except LLMError:
            return Health.DOWN

    async def complete(self, prompt: str, **options: Unpack[CompletionOptions]) -> Completion:
        """Generate from `prompt`; raise LLMUnavailable or LLMBadAnswer, never an HTTP error."""
        body = api.completion_request(prompt, options)
        return api.completion(
            self._where("/completion"), await self._send("POST", "/completion", body)
        )

    async def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        n_predict: int,
        temperature: float,
        seed: int | None = None,
        grammar: str | None = None,
        n_probs: int = 0,
        cache_prompt: bool = True,
        id_slot: int | None = None,
    ) -> Completion:
        """Answer a conversation; the server renders it with the model's own chat template.

        A last `assistant` message is continued (llama-server's prefill); `grammar` (GBNF)
        constrains what is generated after it; `id_slot` pins it to one server slot. Same
        answer and errors as `complete()`; `probabilities` come from the OpenAI-style
        `logprobs` (the same tokens, bytes and top alternatives) and `content` holds only the
        generated text.
        """
        body = api.chat_request(
            messages, n_predict=n_predict, temperature=temperature, seed=seed, grammar=grammar,
            n_probs=n_probs, cache_prompt=cache_prompt, id_slot=id_slot,
        )  # fmt: skip
        path = "/v1/chat/completions"
        return api.chat_completion(
            self._where(path), await self._send("POST", path, body), messages
        )

    async def aclose(self) -> None:
        await self._http.aclose()


class BlockingLlamaClient(_Llama):
    """One llama-server, for agents (the blocking router): one `httpx.Client`, thread-safe;
    close it with `close()`. `transport` replaces httpx's (tests)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, timeout, api_key)
        self._http = httpx.Client(transport=transport, **self._http_options)

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> Answer:
        """One exchange within `timeout` seconds in all, as LlamaClient's. Nothing interrupts a
        blocking read, and httpx's read timeout restarts with each byte, so the exchange runs
        in a thread of its own, and the caller stops waiting at the deadline; the thread stops
        at its next read past it (or its read timeout), closing the connection."""
        content = None if body is None else _json(body)
        deadline = time.monotonic() + self.timeout
        outcome: queue.SimpleQueue[Answer | Exception] = queue.SimpleQueue()

        def exchange() -> None:
            try:
                with self._http.stream(method, self._url(path), content=content) as response:
                    capped = _Capped()
                    for chunk in response.iter_bytes():
                        capped.add(chunk)
                        if time.monotonic() > deadline:
                            raise TimeoutError
                    outcome.put(Answer(response.status_code, capped.content()))
            except Exception as exc:  # the caller's to raise, as ours
                outcome.put(exc)

        threading.Thread(target=exchange, name=f"llm {method} {path}", daemon=True).start()
        with self._answering(path):
            try:
                answer = outcome.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError from None
            if isinstance(answer, Exception):
                raise answer
            return answer

    def health(self) -> Health:
        try:
            return api.health(self._send("GET", "/health"))
        except LLMError:
            return Health.DOWN

    def complete(self, prompt: str, **options: Unpack[CompletionOptions]) -> Completion:
        """Generate from `prompt`; raise LLMUnavailable or LLMBadAnswer, never an HTTP error."""
        answer = self._send("POST", "/completion", api.completion_request(prompt, options))
        return api.completion(self._where("/completion"), answer)

    def close(self) -> None:
        self._http.close()
