"""Async client for llama-server (`/health`, `/completion`, `/v1/chat/completions`); raises only
our errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import LLMBadAnswer, LLMUnavailable
from .http1 import AnswerTooLarge, ConnectionPool, NoAnswer, Response

__all__ = ["Completion", "Health", "LlamaClient", "TokenProbability", "TopLogprob"]

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


class LlamaClient:
    """One llama-server. Holds one connection pool; close it with `aclose()`."""

    def __init__(self, base_url: str, *, timeout: float, api_key: str | None = None) -> None:
        self.base_url = base_url
        self.timeout = timeout
        """Seconds for a whole request, from connecting to the last byte of the answer."""
        url = urlsplit(base_url)
        headers = [(b"Host", url.netloc.encode()), (b"Content-Type", b"application/json")]
        if api_key:
            headers.append((b"Authorization", f"Bearer {api_key}".encode()))
        self._prefix = url.path.rstrip("/")
        # Our own pool on asyncio, h11 parsing the answers: httpx's client and transport, and
        # httpcore's pool under them, cost more a request than the exchange itself (http1.py).
        self._pool = ConnectionPool(url.hostname or "", url.port or 80, headers)

    async def _send(self, method: bytes, path: str, content: bytes | None = None) -> Response:
        """One exchange, its answer read whole, within `timeout` seconds in all, else
        TimeoutError: one deadline on the whole exchange, because a server that drips one byte
        a second would never trip a per-read timeout and would hold a decision slot for ever."""
        async with asyncio.timeout(self.timeout):
            return await self._pool.request(method, (self._prefix + path).encode(), content)

    async def health(self) -> Health:
        try:
            response = await self._send(b"GET", "/health")
        except (TimeoutError, NoAnswer, AnswerTooLarge):
            return Health.DOWN
        if response.status == 200:
            return Health.READY
        if response.status == 503 and LOADING_MESSAGE in _error_message(response.content):
            return Health.LOADING
        return Health.DOWN

    async def complete(
        self,
        prompt: str,
        *,
        n_predict: int,
        temperature: float,
        stop: Sequence[str] = (),
        json_schema: dict[str, Any] | None = None,
        n_probs: int = 0,
        cache_prompt: bool = True,
    ) -> Completion:
        """Generate from `prompt`; raise LLMUnavailable or LLMBadAnswer, never an HTTP error."""
        body: dict[str, Any] = {
            "prompt": prompt,
            "n_predict": n_predict,
            "temperature": temperature,
            "stop": list(stop),
            "cache_prompt": cache_prompt,
        }
        if json_schema is not None:
            body["json_schema"] = json_schema
        if n_probs:
            body["n_probs"] = n_probs
        parsed = await self._post("/completion", body, _Body)
        return Completion(
            content=parsed.content,
            tokens_predicted=parsed.tokens_predicted,
            tokens_evaluated=parsed.tokens_evaluated,
            tokens_cached=int(parsed.timings.get("cache_n", 0)),
            timings=parsed.timings,
            probabilities=parsed.completion_probabilities,
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
        """POST `body`; a 200 answer parsed as `shape`, else LLMUnavailable (no answer, busy,
        loading) or LLMBadAnswer (any other failure, a malformed body included)."""
        where = f"{self.base_url}{path}"
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        try:
            response = await self._send(b"POST", path, content.encode())
        except TimeoutError:
            raise LLMUnavailable(f"{where}: no complete answer within {self.timeout:g}s") from None
        except NoAnswer as exc:
            raise LLMUnavailable(f"{where}: unreachable: {exc}") from None
        except AnswerTooLarge as exc:
            raise LLMBadAnswer(f"{where}: {exc}") from None
        if response.status == 503:
            message = _error_message(response.content)
            state = "still loading the model" if LOADING_MESSAGE in message else message
            raise LLMUnavailable(f"{where}: HTTP 503: {state}")
        if response.status != 200:
            raise LLMBadAnswer(
                f"{where}: HTTP {response.status}: {_error_message(response.content)}"
            )
        try:
            return shape.model_validate_json(response.content)
        except ValidationError as exc:
            raise LLMBadAnswer(f"{where}: malformed body: {exc.errors()[0]['msg']}") from None

    async def aclose(self) -> None:
        await self._pool.aclose()
