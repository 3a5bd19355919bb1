"""The proposal's LLMRouter (§3.2): keyword routing, fallback to the other server, usage metrics."""

from __future__ import annotations

import asyncio
import atexit
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, load_config
from ..config import config_path as resolve_config_path
from ..document.metadata import QUERY_TYPES
from ..document.pipeline import SERVER_NAMES, ServerName
from ..errors import ConfigError, LLMUnavailable
from ..log import get_logger
from .api import Completion, CompletionOptions, Health
from .apikey import KeyFileError, key_file, read_key
from .client import BlockingLlamaClient, LlamaClient

__all__ = [
    "STOP",
    "AsyncRouter",
    "LLMMetrics",
    "LLMRouter",
    "Routed",
    "classify_query",
    "get_router",
]

STOP = ("</s>", "<|im_end|>", "<|endoftext|>")
TRACE_KEPT = 10
"""llm_metadata carries the last 10 trace entries (proposal §3.2); older ones are not kept."""

log = get_logger()


def classify_query(prompt: str) -> str:
    """The proposal's _classify_query: a query type for the trace, from keywords."""
    text = prompt.lower()
    if "residue" in text or "modulo" in text:
        return "residue_analysis"
    if "seed" in text or "prng" in text:
        return "prng_state"
    if "confidence" in text or "probability" in text:
        return "statistical"
    if "json" in text or "config" in text:
        return "config_generation"
    if "plan" in text or "next" in text:
        return "orchestration"
    return "general"


def read_api_key(config: Config, name: ServerName) -> str | None:
    """The key server `name` wants, from apikey.key_file (None: no key to send)."""
    path = key_file(config, name)
    if path is None:
        return None
    try:
        return read_key(path)
    except KeyFileError as exc:
        what = ".api_key_file" if config.server(name).api_key_file else ": the daemon's key file"
        raise ConfigError([f"config: {name}{what}: cannot read: {exc}"]) from None


@dataclass(frozen=True)
class Routed:
    """One answered query: who was chosen (`wanted`), who answered (`endpoint`), and its cost."""

    completion: Completion
    endpoint: ServerName
    wanted: ServerName
    degraded: bool
    query_type: str
    latency_ms: int
    timestamp: str

    def trace_entry(self) -> dict[str, Any]:
        return {
            "timestamp": self.timestamp,
            "model": self.endpoint,
            "query_type": self.query_type,
            "tokens": self.completion.tokens_predicted,
            "latency_ms": self.latency_ms,
            "degraded": self.degraded,
        }


@dataclass
class LLMMetrics:
    """Usage counted for schema v1.0.4 llm_metadata (proposal §3.2)."""

    orchestrator_calls: int = 0
    math_calls: int = 0
    total_tokens: int = 0
    trace: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=TRACE_KEPT))

    def record(self, routed: Routed) -> None:
        if routed.endpoint == "orchestrator":
            self.orchestrator_calls += 1
        else:
            self.math_calls += 1
        self.total_tokens += routed.completion.tokens_predicted
        self.trace.append(routed.trace_entry())

    def llm_metadata(self, config: Config) -> dict[str, Any]:
        return {
            "orchestrator_model": config.orchestrator.model.removesuffix(".gguf"),
            "math_model": config.math.model.removesuffix(".gguf"),
            "orchestrator_calls": self.orchestrator_calls,
            "math_calls": self.math_calls,
            "total_tokens_generated": self.total_tokens,
            "llm_reasoning_trace": list(self.trace),
        }


class _Routing:
    """What both routers share: the choice of server, the order of fallback, and the metrics."""

    def __init__(self, config: Config, is_ready: Callable[[ServerName], bool] | None) -> None:
        self.config = config
        self.metrics = LLMMetrics()
        self._is_ready = is_ready
        self._keywords = tuple(k.lower() for k in config.routing.math_keywords)

    def _client_options(self, name: ServerName) -> dict[str, Any]:
        return {
            "timeout": self.config.routing.request_timeout_seconds,
            "api_key": read_api_key(self.config, name),
        }

    def choose(self, prompt: str) -> ServerName:
        text = prompt.lower()
        return "math" if any(k in text for k in self._keywords) else "orchestrator"

    def _wanted(self, prompt: str, force_endpoint: str | None) -> ServerName:
        if force_endpoint is None:
            return self.choose(prompt)
        if force_endpoint not in SERVER_NAMES:
            raise ValueError(
                f"force_endpoint: expected one of {SERVER_NAMES}, got {force_endpoint!r}"
            )
        return force_endpoint

    def _options(
        self,
        temperature: float | None,
        max_tokens: int | None,
        json_schema: dict[str, Any] | None = None,
        n_probs: int = 0,
    ) -> CompletionOptions:
        routing = self.config.routing
        return {
            "n_predict": max_tokens or routing.default_max_tokens,
            "temperature": routing.default_temperature if temperature is None else temperature,
            "stop": STOP,
            "json_schema": json_schema,
            "n_probs": n_probs,
        }

    @staticmethod
    def _order(wanted: ServerName, query_type: str) -> tuple[ServerName, ...]:
        """The wanted server, then the other."""
        if query_type not in QUERY_TYPES:
            raise ValueError(f"query_type: expected one of {QUERY_TYPES}, got {query_type!r}")
        return (wanted, *(n for n in SERVER_NAMES if n != wanted))

    def _answered(
        self,
        completion: Completion,
        name: ServerName,
        wanted: ServerName,
        query_type: str,
        started: float,
        problems: list[str],
    ) -> Routed:
        routed = Routed(
            completion=completion,
            endpoint=name,
            wanted=wanted,
            degraded=name != wanted,
            query_type=query_type,
            latency_ms=int((time.monotonic() - started) * 1000),
            timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        if routed.degraded:
            log.warning("llm.degraded", wanted=wanted, answered=name, why=problems)
        self.metrics.record(routed)
        return routed

    def get_llm_metadata(self) -> dict[str, Any]:
        return self.metrics.llm_metadata(self.config)

    def reset_metrics(self) -> None:
        self.metrics = LLMMetrics()


def _none_answered(problems: list[str]) -> LLMUnavailable:
    return LLMUnavailable("no llama-server could answer: " + "; ".join(problems))


class AsyncRouter(_Routing):
    """Sends each prompt to the math specialist or the orchestrator; the other one stands in."""

    def __init__(
        self,
        config: Config,
        *,
        is_ready: Callable[[ServerName], bool] | None = None,
    ) -> None:
        super().__init__(config, is_ready)
        self.clients = {
            name: LlamaClient(config.server(name).url, **self._client_options(name))
            for name in SERVER_NAMES
        }

    async def _ready(self, name: ServerName) -> bool:
        if self._is_ready is not None:
            return self._is_ready(name)
        return await self.clients[name].health() is Health.READY

    async def route(
        self,
        prompt: str,
        *,
        force_endpoint: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        json_schema: dict[str, Any] | None = None,
        n_probs: int = 0,
        query_type: str | None = None,
    ) -> Routed:
        """Ask the chosen server, else the other; raise LLMUnavailable when neither answers."""
        wanted = self._wanted(prompt, force_endpoint)
        options = self._options(temperature, max_tokens, json_schema, n_probs)

        def ask(client: LlamaClient) -> Awaitable[Completion]:
            return client.complete(prompt, **options)

        return await self._first_answer(wanted, ask, query_type or classify_query(prompt))

    async def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        endpoint: ServerName,
        temperature: float,
        seed: int | None,
        max_tokens: int,
        grammar: str | None,
        n_probs: int,
        query_type: str,
        id_slot: int | None = None,
    ) -> Routed:
        """A conversation, rendered by the answering server's own chat template; falls back to
        the other server like `route`."""

        def ask(client: LlamaClient) -> Awaitable[Completion]:
            return client.chat(
                messages,
                n_predict=max_tokens,
                temperature=temperature,
                seed=seed,
                grammar=grammar,
                n_probs=n_probs,
                id_slot=id_slot,
            )

        return await self._first_answer(endpoint, ask, query_type)

    async def _first_answer(
        self,
        wanted: ServerName,
        ask: Callable[[LlamaClient], Awaitable[Completion]],
        query_type: str,
    ) -> Routed:
        problems: list[str] = []
        for name in self._order(wanted, query_type):
            if not await self._ready(name):
                problems.append(f"{name}: not ready")
                continue
            started = time.monotonic()
            try:
                completion = await ask(self.clients[name])
            except LLMUnavailable as exc:
                problems.append(f"{name}: {exc}")
                continue
            return self._answered(completion, name, wanted, query_type, started, problems)
        raise _none_answered(problems)

    async def orchestrate(self, task: str, **kw: Any) -> Routed:
        return await self.route(task, force_endpoint="orchestrator", **kw)

    async def calculate(self, query: str, **kw: Any) -> Routed:
        return await self.route(query, force_endpoint="math", **kw)

    async def health_check(self) -> dict[str, bool]:
        states = await asyncio.gather(*(self.clients[n].health() for n in SERVER_NAMES))
        return {
            name: state is Health.READY for name, state in zip(SERVER_NAMES, states, strict=True)
        }

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()


class LLMRouter(_Routing):
    """The blocking API agents use (proposal §3.5): the same routing, answers as plain text, on
    blocking clients (httpx.Client); callable from any thread, or from inside an event loop."""

    def __init__(
        self, config: Config, *, is_ready: Callable[[ServerName], bool] | None = None
    ) -> None:
        super().__init__(config, is_ready)
        self._lock = threading.Lock()  # the metrics, and `closed`
        self.clients = {
            name: BlockingLlamaClient(config.server(name).url, **self._client_options(name))
            for name in SERVER_NAMES
        }
        self.closed = False

    def _ready(self, name: ServerName) -> bool:
        if self._is_ready is not None:
            return self._is_ready(name)
        return self.clients[name].health() is Health.READY

    def route(
        self,
        prompt: str,
        force_endpoint: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> str:
        """The chosen server's answer, else the other's; LLMUnavailable when neither answers."""
        if self.closed:
            raise RuntimeError("LLMRouter is closed")
        wanted = self._wanted(prompt, force_endpoint)
        options = self._options(temperature, max_tokens)
        query_type = classify_query(prompt)
        problems: list[str] = []
        for name in self._order(wanted, query_type):
            if not self._ready(name):
                problems.append(f"{name}: not ready")
                continue
            started = time.monotonic()
            try:
                completion = self.clients[name].complete(prompt, **options)
            except LLMUnavailable as exc:
                problems.append(f"{name}: {exc}")
                continue
            with self._lock:
                self._answered(completion, name, wanted, query_type, started, problems)
            return completion.content
        raise _none_answered(problems)

    def orchestrate(self, task: str) -> str:
        return self.route(task, force_endpoint="orchestrator")

    def calculate(self, math_query: str) -> str:
        return self.route(math_query, force_endpoint="math")

    def get_llm_metadata(self) -> dict[str, Any]:
        with self._lock:
            return super().get_llm_metadata()

    def reset_metrics(self) -> None:
        with self._lock:
            super().reset_metrics()

    def health_check(self) -> dict[str, bool]:
        return {name: self.clients[name].health() is Health.READY for name in SERVER_NAMES}

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for client in self.clients.values():
            client.close()

    def __enter__(self) -> LLMRouter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_instance: LLMRouter | None = None
_instance_lock = threading.Lock()


def get_router(config_path: str | Path | None = None) -> LLMRouter:
    """The process-wide LLMRouter for agent code, made on first use from the daemon's config.

    Path: `config_path`, else $PRNG_DAEMON_CONFIG, else /etc/prng-llm-daemon/config.json.
    """
    global _instance
    with _instance_lock:
        if _instance is None or _instance.closed:
            _instance = LLMRouter(load_config(resolve_config_path(config_path)))
            atexit.register(_instance.close)
        return _instance
