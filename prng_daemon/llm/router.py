"""The proposal's LLMRouter (§3.2): keyword routing, fallback to the other server, usage metrics."""

from __future__ import annotations

import asyncio
import atexit
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..config import Config, load_config
from ..config import config_path as resolve_config_path
from ..document.metadata import QUERY_TYPES
from ..document.pipeline import SERVER_NAMES, ServerName
from ..errors import ConfigError, LLMUnavailable
from ..log import get_logger
from .apikey import KeyFileError, key_file, read_key
from .client import Completion, Health, LlamaClient

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

T = TypeVar("T")
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


class AsyncRouter:
    """Sends each prompt to the math specialist or the orchestrator; the other one stands in."""

    def __init__(
        self,
        config: Config,
        *,
        is_ready: Callable[[ServerName], bool] | None = None,
    ) -> None:
        self.config = config
        self.metrics = LLMMetrics()
        self._is_ready = is_ready
        self._keywords = tuple(k.lower() for k in config.routing.math_keywords)
        self.clients = {
            name: LlamaClient(
                config.server(name).url,
                timeout=config.routing.request_timeout_seconds,
                api_key=read_api_key(config, name),
            )
            for name in SERVER_NAMES
        }

    def choose(self, prompt: str) -> ServerName:
        text = prompt.lower()
        return "math" if any(k in text for k in self._keywords) else "orchestrator"

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
        if force_endpoint is not None and force_endpoint not in SERVER_NAMES:
            raise ValueError(
                f"force_endpoint: expected one of {SERVER_NAMES}, got {force_endpoint!r}"
            )
        routing = self.config.routing

        def ask(client: LlamaClient) -> Awaitable[Completion]:
            return client.complete(
                prompt,
                n_predict=max_tokens or routing.default_max_tokens,
                temperature=routing.default_temperature if temperature is None else temperature,
                stop=STOP,
                json_schema=json_schema,
                n_probs=n_probs,
            )

        return await self._first_answer(
            force_endpoint or self.choose(prompt), ask, query_type or classify_query(prompt)
        )

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
        if query_type not in QUERY_TYPES:
            raise ValueError(f"query_type: expected one of {QUERY_TYPES}, got {query_type!r}")
        problems = []
        for name in (wanted, *(n for n in SERVER_NAMES if n != wanted)):
            if not await self._ready(name):
                problems.append(f"{name}: not ready")
                continue
            started = time.monotonic()
            try:
                completion = await ask(self.clients[name])
            except LLMUnavailable as exc:
                problems.append(f"{name}: {exc}")
                continue
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
        raise LLMUnavailable("no llama-server could answer: " + "; ".join(problems))

    async def orchestrate(self, task: str, **kw: Any) -> Routed:
        return await self.route(task, force_endpoint="orchestrator", **kw)

    async def calculate(self, query: str, **kw: Any) -> Routed:
        return await self.route(query, force_endpoint="math", **kw)

    def get_llm_metadata(self) -> dict[str, Any]:
        return self.metrics.llm_metadata(self.config)

    def reset_metrics(self) -> None:
        self.metrics = LLMMetrics()

    async def health_check(self) -> dict[str, bool]:
        states = await asyncio.gather(*(self.clients[n].health() for n in SERVER_NAMES))
        return {
            name: state is Health.READY for name, state in zip(SERVER_NAMES, states, strict=True)
        }

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()


class LLMRouter:
    """The blocking API agents use (proposal §3.5): same methods, answers as plain text.

    It runs its own private event loop, so it must not be called from inside a running one.
    """

    def __init__(
        self, config: Config, *, is_ready: Callable[[ServerName], bool] | None = None
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._router = AsyncRouter(config, is_ready=is_ready)
        self.closed = False

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self.closed:
                coro.close()
                raise RuntimeError("LLMRouter is closed")
            return self._loop.run_until_complete(coro)

    def route(
        self,
        prompt: str,
        force_endpoint: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> str:
        routed = self._run(
            self._router.route(
                prompt,
                force_endpoint=force_endpoint,
                temperature=temperature,
                max_tokens=max_tokens,
            )
        )
        return routed.completion.content

    def orchestrate(self, task: str) -> str:
        return self.route(task, force_endpoint="orchestrator")

    def calculate(self, math_query: str) -> str:
        return self.route(math_query, force_endpoint="math")

    def get_llm_metadata(self) -> dict[str, Any]:
        return self._router.get_llm_metadata()

    def reset_metrics(self) -> None:
        self._router.reset_metrics()

    def health_check(self) -> dict[str, bool]:
        return self._run(self._router.health_check())

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self._loop.run_until_complete(self._router.aclose())
            self._loop.close()
            self.closed = True

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
