"""Clients for llama-server (`/health`, `/completion`, `/v1/chat/completions`) on httpx: the
daemon's async one and the agents' blocking one. Both raise only our errors (docs/llm-client.md)."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import Any, NamedTuple, Required, TypedDict, TypeVar, Unpack

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import LLMBadAnswer, LLMError, LLMUnavailable

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

# llama-server answers 503 with this message until the model is loaded (503 also means "busy").
LOADING_MESSAGE = "Loading model"

_Shape = TypeVar("_Shape", bound=BaseModel)


class Health(StrEnum):
    READY = "ready"
    LOADING = "loading"
    DOWN = "down"


class TopLogprob(BaseModel):
    model_config = ConfigDict(frozen=True)

    token: str
    bytes: list[int] | None = None
    logprob: float


class TokenProbability(BaseModel):
    """One generated token with the `n_probs` most likely tokens the model saw at that point."""

    model_config = ConfigDict(frozen=True)

    token: str
    bytes: list[int] | None = None
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Completion(BaseModel):
    """What one `/completion` call produced.

    `tokens_cached` is the number of prompt tokens taken from the prompt cache (`timings.cache_n`):
    llama-server's own `tokens_cached` field counts the whole slot, generated tokens included, so
    it is above zero even for a cold prompt. `tokens_evaluated` is the prompt's length in tokens.
    """

    model_config = ConfigDict(frozen=True)

    content: str
    tokens_predicted: int
    tokens_evaluated: int
    tokens_cached: int
    timings: dict[str, float]
    probabilities: list[TokenProbability]


class _Logprobs(BaseModel):
    content: list[TokenProbability] = Field(default_factory=list)


class _Message(BaseModel):
    content: str


class _Choice(BaseModel):
    message: _Message
    logprobs: _Logprobs | None = None


class _Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)


class _ChatBody(BaseModel):
    """The fields of a /v1/chat/completions answer that we use; the rest is ignored."""

    choices: list[_Choice] = Field(min_length=1)
    usage: _Usage
    timings: dict[str, float] = Field(default_factory=dict)


class _Body(BaseModel):
    """The fields of llama-server's /completion answer that we use; the rest is ignored."""

    content: str
    tokens_predicted: int = Field(ge=0)
    tokens_evaluated: int = Field(ge=0)
    timings: dict[str, float] = Field(default_factory=dict)
    completion_probabilities: list[TokenProbability] = Field(default_factory=list)


def _error_message(content: bytes) -> str:
    try:
        message = json.loads(content)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return content.decode(errors="replace")[:200]
    return str(message)


class CompletionOptions(TypedDict, total=False):
    """How `complete()` generates: llama-server's /completion fields."""

    n_predict: Required[int]
    temperature: Required[float]
    stop: Sequence[str]
    json_schema: dict[str, Any] | None
    n_probs: int
    cache_prompt: bool


def _completion_request(prompt: str, options: CompletionOptions) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": prompt,
        "n_predict": options["n_predict"],
        "temperature": options["temperature"],
        "stop": list(options.get("stop", ())),
        "cache_prompt": options.get("cache_prompt", True),
    }
    if (schema := options.get("json_schema")) is not None:
        body["json_schema"] = schema
    if n_probs := options.get("n_probs", 0):
        body["n_probs"] = n_probs
    return body


def _completion(parsed: _Body) -> Completion:
    return Completion(
        content=parsed.content,
        tokens_predicted=parsed.tokens_predicted,
        tokens_evaluated=parsed.tokens_evaluated,
        tokens_cached=int(parsed.timings.get("cache_n", 0)),
        timings=parsed.timings,
        probabilities=parsed.completion_probabilities,
    )


class _Answer(NamedTuple):
    status: int
    content: bytes


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


class _Llama:
    """What both clients share: the server's address and headers, the requests' bodies, and how
    an answer, or the lack of one, becomes a result or one of our errors."""

    def __init__(self, base_url: str, timeout: float, api_key: str | None) -> None:
        self.base_url = base_url
        self.timeout = timeout
        """Seconds for a whole request, from connecting to the last byte of the answer."""
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # trust_env=False: an operator's http_proxy must not send loopback requests elsewhere.
        # The timeouts are httpx's per phase (connect, each read, ...): the whole request's
        # deadline is each client's own.
        self._http_options: dict[str, Any] = {
            "base_url": base_url,
            "headers": headers,
            "timeout": timeout,
            "limits": _LIMITS,
            "trust_env": False,
        }

    @contextmanager
    def _answering(self, path: str) -> Iterator[None]:
        """httpx's errors, and the deadline's, as ours."""
        where = f"{self.base_url}{path}"
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

    @staticmethod
    def _health(answer: _Answer) -> Health:
        if answer.status == 200:
            return Health.READY
        if answer.status == 503 and LOADING_MESSAGE in _error_message(answer.content):
            return Health.LOADING
        return Health.DOWN

    def _parsed(self, path: str, answer: _Answer, shape: type[_Shape]) -> _Shape:
        """A 200 answer parsed as `shape`, else LLMUnavailable (busy, loading) or LLMBadAnswer
        (any other failure, a malformed body included)."""
        where = f"{self.base_url}{path}"
        if answer.status == 503:
            message = _error_message(answer.content)
            state = "still loading the model" if LOADING_MESSAGE in message else message
            raise LLMUnavailable(f"{where}: HTTP 503: {state}")
        if answer.status != 200:
            raise LLMBadAnswer(f"{where}: HTTP {answer.status}: {_error_message(answer.content)}")
        try:
            return shape.model_validate_json(answer.content)
        except ValidationError as exc:
            raise LLMBadAnswer(f"{where}: malformed body: {exc.errors()[0]['msg']}") from None


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


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

    async def _send(self, method: str, path: str, content: bytes | None = None) -> _Answer:
        """One exchange, its answer read whole, within `timeout` seconds in all: one deadline on
        the whole exchange, because a server that drips one byte a second never trips a
        per-read timeout and would hold a decision slot for ever. Cancelled (the deadline),
        httpx closes the connection: its late answer is never read as the next request's."""
        with self._answering(path):
            async with (
                asyncio.timeout(self.timeout),
                self._http.stream(method, path, content=content) as response,
            ):
                body = _Capped()
                async for chunk in response.aiter_bytes():
                    body.add(chunk)
                return _Answer(response.status_code, body.content())

    async def health(self) -> Health:
        try:
            return self._health(await self._send("GET", "/health"))
        except LLMError:
            return Health.DOWN

    async def complete(self, prompt: str, **options: Unpack[CompletionOptions]) -> Completion:
        """Generate from `prompt`; raise LLMUnavailable or LLMBadAnswer, never an HTTP error."""
        body = _completion_request(prompt, options)
        return _completion(await self._post("/completion", body, _Body))

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
        body: dict[str, Any] = {
            "messages": list(messages),
            "max_tokens": n_predict,
            "temperature": temperature,
            "cache_prompt": cache_prompt,
        }
        if seed is not None:
            body["seed"] = seed
        if id_slot is not None:  # llama-server queues it for that slot, busy or not
            body["id_slot"] = id_slot
        if grammar is not None:
            body["grammar"] = grammar
        if n_probs:
            body["logprobs"] = True
            body["top_logprobs"] = n_probs
        parsed = await self._post("/v1/chat/completions", body, _ChatBody)
        choice = parsed.choices[0]
        content = choice.message.content
        if messages and messages[-1]["role"] == "assistant":
            # llama-server returns a continued message whole, prefill included.
            content = content.removeprefix(messages[-1]["content"])
        return Completion(
            content=content,
            tokens_predicted=parsed.usage.completion_tokens,
            tokens_evaluated=parsed.usage.prompt_tokens,
            tokens_cached=int(parsed.timings.get("cache_n", 0)),
            timings=parsed.timings,
            probabilities=choice.logprobs.content if choice.logprobs else [],
        )

    async def _post(self, path: str, body: dict[str, Any], shape: type[_Shape]) -> _Shape:
        return self._parsed(path, await self._send("POST", path, _json(body)), shape)

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

    def _send(self, method: str, path: str, content: bytes | None = None) -> _Answer:
        """One exchange within `timeout` seconds in all, as LlamaClient's. Nothing interrupts a
        blocking read, and httpx's read timeout restarts with each byte, so the exchange runs
        in a thread of its own, and the caller stops waiting at the deadline; the thread stops
        at its next read past it (or its read timeout), closing the connection."""
        deadline = time.monotonic() + self.timeout
        outcome: queue.SimpleQueue[_Answer | Exception] = queue.SimpleQueue()

        def exchange() -> None:
            try:
                with self._http.stream(method, path, content=content) as response:
                    body = _Capped()
                    for chunk in response.iter_bytes():
                        body.add(chunk)
                        if time.monotonic() > deadline:
                            raise TimeoutError
                    outcome.put(_Answer(response.status_code, body.content()))
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
            return self._health(self._send("GET", "/health"))
        except LLMError:
            return Health.DOWN

    def complete(self, prompt: str, **options: Unpack[CompletionOptions]) -> Completion:
        """Generate from `prompt`; raise LLMUnavailable or LLMBadAnswer, never an HTTP error."""
        body = _completion_request(prompt, options)
        answer = self._send("POST", "/completion", _json(body))
        return _completion(self._parsed("/completion", answer, _Body))

    def close(self) -> None:
        self._http.close()
