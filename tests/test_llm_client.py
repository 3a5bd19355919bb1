"""LlamaClient (the daemon's) and BlockingLlamaClient (the agents') against a fake llama-server:
typed results, kept-alive connections, and our own errors for every fault."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from prng_daemon.config import Config, DaemonSettings
from prng_daemon.errors import ConfigError, LLMBadAnswer, LLMUnavailable
from prng_daemon.llm import AsyncRouter, BlockingLlamaClient, Completion, Health, LlamaClient
from prng_daemon.llm.client import MAX_BODY

from .fake_llama import CLOSING_SECONDS, FakeLlama, llm_config
from .helpers import free_port, wait_until


class Asker(Protocol):
    """One client kept across calls: `health()`, and `complete()` of "Answer:" by default."""

    def health(self) -> Health: ...

    def complete(self, prompt: str = "Answer:", **kw: Any) -> Completion: ...


@contextmanager
def _async_client(url: str, timeout: float, transport: Any) -> Iterator[Asker]:
    with asyncio.Runner() as runner:  # one loop for the client's whole life
        client = LlamaClient(url, timeout=timeout, transport=transport)

        class Ask:
            def health(self) -> Health:
                return runner.run(client.health())

            def complete(self, prompt: str = "Answer:", **kw: Any) -> Completion:
                kw = {"n_predict": 32, "temperature": 0.5, **kw}
                return runner.run(client.complete(prompt, **kw))

        try:
            yield Ask()
        finally:
            runner.run(client.aclose())


@contextmanager
def _blocking_client(url: str, timeout: float, transport: Any) -> Iterator[Asker]:
    client = BlockingLlamaClient(url, timeout=timeout, transport=transport)

    class Ask:
        def health(self) -> Health:
            return client.health()

        def complete(self, prompt: str = "Answer:", **kw: Any) -> Completion:
            return client.complete(prompt, **{"n_predict": 32, "temperature": 0.5, **kw})

    try:
        yield Ask()
    finally:
        client.close()


Client = Callable[..., AbstractContextManager[Asker]]
"""`with client(url, timeout=5, transport=None) as ask:` one of the two clients, as an Asker."""


@pytest.fixture(params=["async", "blocking"])
def client(request: pytest.FixtureRequest) -> Client:
    """Each test runs against the daemon's client and against the agents' blocking one."""
    made = _async_client if request.param == "async" else _blocking_client

    def open_client(
        url: str, timeout: float = 5, transport: Any = None
    ) -> AbstractContextManager[Asker]:
        return made(url, timeout, transport)

    return open_client


def _complete(client: Client, url: str, timeout: float = 5, **kw: Any) -> Completion:
    with client(url, timeout) as ask:
        return ask.complete(**kw)


def _health(client: Client, url: str) -> Health:
    with client(url, 2) as ask:
        return ask.health()


def test_health_tells_loading_from_ready_from_down(client: Client) -> None:
    with FakeLlama() as fake:
        assert _health(client, fake.url) is Health.READY
        fake.mode = "loading"
        assert _health(client, fake.url) is Health.LOADING
    assert _health(client, f"http://127.0.0.1:{free_port()}") is Health.DOWN


def test_completion_is_typed_and_sends_every_option(client: Client) -> None:
    schema = {"type": "object"}
    with FakeLlama() as fake:
        done = _complete(client, fake.url, stop=["<|im_end|>"], json_schema=schema, n_probs=3)
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


def test_tokens_cached_counts_prompt_tokens_reused_not_the_whole_slot(client: Client) -> None:
    with FakeLlama() as fake:
        _complete(client, fake.url)
        again = _complete(client, fake.url)
    assert again.tokens_cached == 1


def test_requests_share_one_kept_alive_connection_as_with_llama_server(client: Client) -> None:
    """The fake keeps connections alive like llama-server, and the client reuses its own: the
    benchmarks time the daemon's requests, not a TCP connect for each."""
    with FakeLlama() as fake:
        with client(fake.url) as ask:
            for _ in range(10):
                ask.complete(n_predict=4, temperature=0.0)
        assert len(fake.requests) == 10
        assert fake.connections == 1


def test_a_connection_the_server_closed_is_replaced_on_the_next_request(client: Client) -> None:
    """llama-server (or a proxy) may close a kept-alive connection between requests; the next
    request goes out on a new one instead of failing on the dead one."""
    with FakeLlama() as fake:
        with client(fake.url) as ask:
            ask.complete(n_predict=4, temperature=0.0)
            fake.hang_up()
            wait_until(lambda: fake.open_connections == 0, what="the fake to close it")
            ask.complete(n_predict=4, temperature=0.0)
        assert len(fake.requests) == 2
        assert fake.connections == 2


def test_no_request_is_sent_on_a_connection_the_server_is_closing_for_idleness(
    client: Client,
) -> None:
    """llama-server closes a connection idle for 5 s; a request sent at that instant is lost
    and would read as "unreachable". The client drops its idle connections after 4 s, so it
    never sends on one so old: here against a server closing at 4.5 s, the request sent in
    its closing window goes out on a new connection (httpx's default expiry, 5 s, loses it)."""
    with FakeLlama() as fake:
        fake.idle_close = 4.5
        with client(fake.url) as ask:
            ask.complete(n_predict=4, temperature=0.0)
            # The idleness under test, not synchronisation: into the server's closing window.
            time.sleep(fake.idle_close + CLOSING_SECONDS / 2)
            ask.complete(n_predict=4, temperature=0.0)
        assert len(fake.requests) == 2
        assert fake.connections == 2


@pytest.mark.parametrize(
    ("mode", "error", "says"),
    [
        ("loading", LLMUnavailable, "still loading the model"),
        ("http500", LLMBadAnswer, "HTTP 500: fake failure"),
        ("bad_body", LLMBadAnswer, "malformed body"),
        ("not_http", LLMUnavailable, "unreachable: RemoteProtocolError"),
    ],
)
def test_faults_become_our_typed_errors(
    client: Client, mode: str, error: type[Exception], says: str
) -> None:
    with FakeLlama() as fake:
        fake.mode = mode
        with pytest.raises(error, match=says):
            _complete(client, fake.url)


@pytest.mark.parametrize(
    ("raised", "error", "says"),
    [
        (httpx.ConnectError("refused"), LLMUnavailable, "unreachable: ConnectError: refused"),
        (httpx.ReadError(""), LLMUnavailable, "unreachable: ReadError$"),
        (httpx.ReadTimeout("slow"), LLMUnavailable, "no complete answer within 5s"),
        (httpx.PoolTimeout("full"), LLMUnavailable, "no complete answer within 5s"),
        (httpx.DecodingError("bad gzip"), LLMBadAnswer, "DecodingError: bad gzip"),
    ],
)
def test_no_httpx_error_reaches_the_caller(
    client: Client, raised: httpx.HTTPError, error: type[Exception], says: str
) -> None:
    """Whatever httpx raises (a transport that raises it stands in for httpx's), the caller
    gets LLMUnavailable or LLMBadAnswer, and health() says DOWN."""

    def fail(request: httpx.Request) -> httpx.Response:
        raise raised

    with client("http://127.0.0.1:9", transport=httpx.MockTransport(fail)) as ask:
        with pytest.raises(error, match=says):
            ask.complete()
        assert ask.health() is Health.DOWN


def test_unreachable_server_is_unavailable(client: Client) -> None:
    with pytest.raises(LLMUnavailable, match="unreachable: ConnectError"):
        _complete(client, f"http://127.0.0.1:{free_port()}")


def test_hang_past_the_timeout_is_unavailable_in_time(client: Client) -> None:
    with FakeLlama() as fake:
        fake.mode = "hang"
        started = time.monotonic()
        with pytest.raises(LLMUnavailable, match="no complete answer within 0.3s"):
            _complete(client, fake.url, timeout=0.3)
        assert time.monotonic() - started < 2


def test_a_server_that_drips_is_cut_off_at_the_total_deadline(client: Client) -> None:
    """One byte every 50 ms never trips a per-read timeout; the whole answer would take
    tens of seconds, so only a deadline on the whole request ends it."""
    with FakeLlama() as fake:
        fake.mode = "drip"
        fake.drip_seconds = 0.05
        started = time.monotonic()
        with pytest.raises(LLMUnavailable, match="no complete answer within 0.5s"):
            _complete(client, fake.url, timeout=0.5)
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


def test_the_configs_tests_build_never_name_the_machines_state_dir() -> None:
    """The test above failed wherever the daemon had run: /var/lib/.../llm.key was sent."""
    assert not llm_config(1, 2).daemon.state_dir.is_relative_to(DaemonSettings().state_dir)


def test_unreadable_key_file_is_a_config_error(tmp_path: Path) -> None:
    server = {"model": "m.gguf", "port": 8080, "api_key_file": str(tmp_path / "missing")}
    with pytest.raises(ConfigError, match="orchestrator.api_key_file: cannot read"):
        AsyncRouter(llm_config(8080, 8081, orchestrator=server))


def test_a_chunked_answer_is_read_whole_and_its_connection_kept(client: Client) -> None:
    """llama-server streams in chunked encoding; an answer in chunks is parsed like one with a
    Content-Length, and its end is found: the next request goes out on the same connection."""
    with FakeLlama() as fake:
        fake.mode = "chunked"
        with client(fake.url) as ask:
            done = [ask.complete(n_predict=4, temperature=0.0) for _ in "ab"]
        assert fake.connections == 1
    assert [d.content for d in done] == ['{"decision": "proceed", "confidence": "high", '
                                         '"reasoning": "fake"}'] * 2  # fmt: skip
    assert done[1].tokens_cached == 1


def test_an_answer_over_the_size_bound_is_a_bad_answer_not_gigabytes_in_memory(
    client: Client,
) -> None:
    with FakeLlama() as fake:
        fake.mode = "huge"
        with pytest.raises(LLMBadAnswer, match=f"answer body over {MAX_BODY} bytes"):
            _complete(client, fake.url, timeout=30)


def test_a_request_cut_off_by_the_deadline_never_leaves_its_connection_for_the_next(
    client: Client,
) -> None:
    """The first answer comes after the deadline, on a connection the client would otherwise
    keep: sent on it, the next request would wait behind that late answer (a two-token
    prompt's) and read it as its own. It goes out on a new connection and gets its own."""
    with FakeLlama() as fake:
        with client(fake.url, timeout=0.3) as ask:
            fake.latency = 1.0
            with pytest.raises(LLMUnavailable, match="no complete answer within 0.3s"):
                ask.complete(n_predict=4, temperature=0.0)
            fake.latency = 0.0
            done = ask.complete("A longer question, four tokens", n_predict=4, temperature=0.0)
        assert fake.connections == 2
    assert done.tokens_evaluated == 8
