"""LlamaClient against a fake llama-server: typed results, and our own errors for every fault."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from prng_daemon.config import Config
from prng_daemon.errors import ConfigError, LLMBadAnswer, LLMUnavailable
from prng_daemon.llm import AsyncRouter, Completion, Health, LlamaClient
from prng_daemon.llm.client import MAX_BODY

from .fake_llama import FakeLlama, llm_config
from .helpers import free_port, wait_until


async def _health(url: str) -> Health:
    client = LlamaClient(url, timeout=2)
    try:
        return await client.health()
    finally:
        await client.aclose()


async def _complete(url: str, timeout: float = 5, **kw: Any) -> Completion:
    client = LlamaClient(url, timeout=timeout)
    try:
        return await client.complete("Answer:", n_predict=32, temperature=0.5, **kw)
    finally:
        await client.aclose()


def test_health_tells_loading_from_ready_from_down() -> None:
    with FakeLlama() as fake:
        assert asyncio.run(_health(fake.url)) is Health.READY
        fake.mode = "loading"
        assert asyncio.run(_health(fake.url)) is Health.LOADING
    assert asyncio.run(_health(f"http://127.0.0.1:{free_port()}")) is Health.DOWN


def test_completion_is_typed_and_sends_every_option() -> None:
    schema = {"type": "object"}
    with FakeLlama() as fake:
        done = asyncio.run(_complete(fake.url, stop=["<|im_end|>"], json_schema=schema, n_probs=3))
        [body] = fake.requests
    assert body == {
        "prompt": "Answer:",
        "n_predict": 32,
        "temperature": 0.5,
        "stop": ["<|im_end|>"],
        "cache_prompt": True,
        "json_schema": schema,
        "n_probs": 3,
    }
    assert done.content.startswith('{"decision": "proceed"')
    assert done.tokens_predicted == len(done.probabilities) > 0
    assert done.tokens_evaluated == 2 and done.tokens_cached == 0
    assert "prompt_ms" in done.timings
    assert len(done.probabilities[0].top_logprobs) >= 1


def test_tokens_cached_counts_prompt_tokens_reused_not_the_whole_slot() -> None:
    with FakeLlama() as fake:
        asyncio.run(_complete(fake.url))
        again = asyncio.run(_complete(fake.url))
    assert again.tokens_cached == 1


def test_requests_share_one_kept_alive_connection_as_with_llama_server() -> None:
    """The fake keeps connections alive like llama-server, and the client reuses its own: the
    benchmarks time the daemon's requests, not a TCP connect for each."""

    async def ask(url: str, times: int) -> None:
        client = LlamaClient(url, timeout=5)
        try:
            for _ in range(times):
                await client.complete("Answer:", n_predict=4, temperature=0.0)
        finally:
            await client.aclose()

    with FakeLlama() as fake:
        asyncio.run(ask(fake.url, 10))
        assert len(fake.requests) == 10
        assert fake.connections == 1


def test_a_connection_the_server_closed_is_replaced_on_the_next_request() -> None:
    """llama-server (or a proxy) may close a kept-alive connection between requests; the next
    request goes out on a new one instead of failing on the dead one."""

    async def ask_twice(fake: FakeLlama) -> None:
        client = LlamaClient(fake.url, timeout=5)
        try:
            await client.complete("Answer:", n_predict=4, temperature=0.0)
            fake.hang_up()
            wait_until(lambda: fake.open_connections == 0, what="the fake to close it")
            await client.complete("Answer:", n_predict=4, temperature=0.0)
        finally:
            await client.aclose()

    with FakeLlama() as fake:
        asyncio.run(ask_twice(fake))
        assert len(fake.requests) == 2
        assert fake.connections == 2


@pytest.mark.parametrize(
    ("mode", "error", "says"),
    [
        ("loading", LLMUnavailable, "still loading the model"),
        ("http500", LLMBadAnswer, "HTTP 500: fake failure"),
        ("bad_body", LLMBadAnswer, "malformed body"),
    ],
)
def test_faults_become_our_typed_errors(mode: str, error: type[Exception], says: str) -> None:
    with FakeLlama() as fake:
        fake.mode = mode
        with pytest.raises(error, match=says):
            asyncio.run(_complete(fake.url))


def test_unreachable_server_is_unavailable() -> None:
    with pytest.raises(LLMUnavailable, match="unreachable"):
        asyncio.run(_complete(f"http://127.0.0.1:{free_port()}"))


def test_hang_past_the_timeout_is_unavailable_in_time() -> None:
    with FakeLlama() as fake:
        fake.mode = "hang"
        started = time.monotonic()
        with pytest.raises(LLMUnavailable, match="no complete answer within 0.3s"):
            asyncio.run(_complete(fake.url, timeout=0.3))
        assert time.monotonic() - started < 2


def test_a_server_that_drips_is_cut_off_at_the_total_deadline() -> None:
    """One byte every 50 ms never trips a per-read timeout; the whole answer would take
    tens of seconds, so only a deadline on the whole request ends it."""
    with FakeLlama() as fake:
        fake.mode = "drip"
        fake.drip_seconds = 0.05
        started = time.monotonic()
        with pytest.raises(LLMUnavailable, match="no complete answer within 0.5s"):
            asyncio.run(_complete(fake.url, timeout=0.5))
        assert time.monotonic() - started < 3


def test_api_key_from_the_key_file_is_sent_as_bearer(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("s3cret\n")

    async def check(config: Config) -> dict[str, bool]:
        router = AsyncRouter(config)
        try:
            await router.orchestrate("hello")
            return await router.health_check()
        finally:
            await router.aclose()

    with FakeLlama() as orchestrator, FakeLlama() as math:
        key = str(tmp_path / "key")
        server = {"model": "m.gguf", "port": orchestrator.port, "api_key_file": key}
        config = llm_config(orchestrator.port, math.port, orchestrator=server)
        assert asyncio.run(check(config)) == {"orchestrator": True, "math": True}
    # /health before the completion, then /health again; the math server has no key.
    assert orchestrator.authorizations == ["Bearer s3cret"] * 3
    assert math.authorizations == [None]


def test_unreadable_key_file_is_a_config_error(tmp_path: Path) -> None:
    server = {"model": "m.gguf", "port": 8080, "api_key_file": str(tmp_path / "missing")}
    with pytest.raises(ConfigError, match="orchestrator.api_key_file: cannot read"):
        AsyncRouter(llm_config(8080, 8081, orchestrator=server))


def test_a_chunked_answer_is_read_whole_and_its_connection_kept() -> None:
    """llama-server streams in chunked encoding; an answer in chunks is parsed like one with a
    Content-Length, and its end is found: the next request goes out on the same connection."""

    async def ask_twice(url: str) -> list[Completion]:
        client = LlamaClient(url, timeout=5)
        try:
            return [await client.complete("Answer:", n_predict=4, temperature=0.0) for _ in "ab"]
        finally:
            await client.aclose()

    with FakeLlama() as fake:
        fake.mode = "chunked"
        done = asyncio.run(ask_twice(fake.url))
        assert fake.connections == 1
    assert [d.content for d in done] == ['{"decision": "proceed", "confidence": "high", '
                                         '"reasoning": "fake"}'] * 2  # fmt: skip
    assert done[1].tokens_cached == 1


def test_an_answer_over_the_size_bound_is_a_bad_answer_not_gigabytes_in_memory() -> None:
    with FakeLlama() as fake:
        fake.mode = "huge"
        with pytest.raises(LLMBadAnswer, match=f"answer body over {MAX_BODY} bytes"):
            asyncio.run(_complete(fake.url, timeout=30))


def test_a_request_cut_off_by_the_deadline_never_leaves_its_connection_for_the_next() -> None:
    """The first answer comes after the deadline, on a connection the client would otherwise
    keep: sent on it, the next request would wait behind that late answer (a two-token
    prompt's) and read it as its own. It goes out on a new connection and gets its own."""

    async def late_then_on_time(fake: FakeLlama) -> Completion:
        client = LlamaClient(fake.url, timeout=0.3)
        try:
            fake.latency = 1.0
            with pytest.raises(LLMUnavailable, match="no complete answer within 0.3s"):
                await client.complete("Answer:", n_predict=4, temperature=0.0)
            fake.latency = 0.0
            return await client.complete("A longer question, four tokens", n_predict=4,
                                         temperature=0.0)  # fmt: skip
        finally:
            await client.aclose()

    with FakeLlama() as fake:
        done = asyncio.run(late_then_on_time(fake))
        assert fake.connections == 2
    assert done.tokens_evaluated == 8
