"""llama-server's API without the HTTP: the bodies the clients send, and what comes back parsed
into typed results, or into our errors."""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, NamedTuple, Required, TypedDict, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import LLMBadAnswer, LLMUnavailable

__all__ = [
    "Answer",
    "Completion",
    "CompletionOptions",
    "Health",
    "TokenProbability",
    "TopLogprob",
    "chat_completion",
    "chat_request",
    "completion",
    "completion_request",
    "health",
]

# llama-server answers 503 with this message until the model is loaded (503 also means "busy").
LOADING_MESSAGE = "Loading model"


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


_Shape = TypeVar("_Shape", bound=BaseModel)


class Answer(NamedTuple):
    """An HTTP answer, read whole."""

    status: int
    content: bytes


class CompletionOptions(TypedDict, total=False):
    """How `complete()` generates: llama-server's /completion fields."""

    n_predict: Required[int]
    temperature: Required[float]
    stop: Sequence[str]
    json_schema: dict[str, Any] | None
    n_probs: int
    cache_prompt: bool


def completion_request(prompt: str, options: CompletionOptions) -> dict[str, Any]:
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


def completion(where: str, answer: Answer) -> Completion:
    parsed = _parsed(where, answer, _Body)
    return Completion(
        content=parsed.content,
        tokens_predicted=parsed.tokens_predicted,
        tokens_evaluated=parsed.tokens_evaluated,
        tokens_cached=int(parsed.timings.get("cache_n", 0)),
        timings=parsed.timings,
        probabilities=parsed.completion_probabilities,
    )


def chat_request(
    messages: Sequence[dict[str, str]],
    *,
    n_predict: int,
    temperature: float,
    seed: int | None,
    grammar: str | None,
    n_probs: int,
    cache_prompt: bool,
    id_slot: int | None,
) -> dict[str, Any]:
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
    return body


def chat_completion(where: str, answer: Answer, messages: Sequence[dict[str, str]]) -> Completion:
    parsed = _parsed(where, answer, _ChatBody)
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


def health(answer: Answer) -> Health:
    """What /health's answer says."""
    if answer.status == 200:
        return Health.READY
    if answer.status == 503 and LOADING_MESSAGE in _error_message(answer.content):
        return Health.LOADING
    return Health.DOWN


def _parsed(where: str, answer: Answer, shape: type[_Shape]) -> _Shape:
    """A 200 answer parsed as `shape`, else LLMUnavailable (busy, loading) or LLMBadAnswer
    (any other failure, a malformed body included)."""
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
