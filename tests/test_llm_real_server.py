"""The LLM layer against two real llama-servers running the tiny random model."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from prng_daemon.config import Config, PolicyConfig
from prng_daemon.document.case import new_case
from prng_daemon.document.decision import ACTIONS, Decision
from prng_daemon.document.metadata import LLMMetadata
from prng_daemon.handlers.decide.policy import Decider
from prng_daemon.handlers.decide.prompt import FINDINGS, build_messages
from prng_daemon.handlers.decide.vote import CaseIndex
from prng_daemon.llm import AsyncRouter, Health, LlamaClient, Routed

from .fake_llama import llm_config
from .helpers import free_port, wait_until
from .test_llm_decision import meta_for


@contextmanager
def llama_server(
    binary: Path,
    model: Path,
    log: Path,
    port: int | None = None,
    args: tuple[str, ...] = ("-c", "16384", "-np", "2", "-t", "1"),
) -> Iterator[int]:
    """One llama-server on a loopback port (a free one by default), stopped and reaped on exit."""
    port = port or free_port()
    # 16384 / 2 slots: the tiny model's vocabulary is byte-level (one token per prompt byte) and a
    # decision prompt is ~5 kB; real models need a quarter of that. Memory: a few MB.
    argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    argv += [*args, "--metrics"]
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _ready(port: int) -> bool:
    return asyncio.run(_health(port)) is Health.READY


async def _health(port: int) -> Health:
    client = LlamaClient(f"http://127.0.0.1:{port}", timeout=2)
    try:
        return await client.health()
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def servers(
    llama_server_bin: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Config]:
    logs = tmp_path_factory.mktemp("llama-logs")
    with (
        llama_server(llama_server_bin, tiny_model, logs / "orchestrator.log") as orchestrator,
        llama_server(llama_server_bin, tiny_model, logs / "math.log") as math,
    ):
        wait_until(lambda: _ready(orchestrator) and _ready(math), timeout=60, what="servers")
        yield llm_config(orchestrator, math, policy={"answer_attempts": 3})


def predicted_total(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = re.search(r"^llamacpp:tokens_predicted_total (\d+)", text, re.MULTILINE)
    assert found, text
    return int(found.group(1))


def test_health_is_loading_then_ready(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """503 "Loading model" is LOADING, not DOWN; the tiny model loads in ~20 ms, so poll hard."""

    async def watch() -> list[Health]:
        port = free_port()
        client = LlamaClient(f"http://127.0.0.1:{port}", timeout=2)
        # A client's first request costs ~40 ms, longer than the loading window: pay it first.
        seen = [await client.health()]
        try:
            with llama_server(llama_server_bin, tiny_model, tmp_path / "log", port):
                while seen[-1] is not Health.READY:
                    seen.append(await client.health())
        finally:
            await client.aclose()
        return seen

    for _ in range(3):  # the loading window is short; a busy machine may step over it
        seen = asyncio.run(asyncio.wait_for(watch(), timeout=60))
        assert seen[-1] is Health.READY
        first_up = next(i for i, s in enumerate(seen) if s is not Health.DOWN)
        assert set(seen[first_up:-1]) <= {Health.LOADING}
        if Health.LOADING in seen:
            return
    pytest.fail("never saw llama-server's 503 Loading model")


def _decide(config: Config, number: int) -> Decision:
    async def go() -> Decision:
        router = AsyncRouter(config)
        try:
            return await Decider(config, router).decide(meta_for(number))
        finally:
            await router.aclose()

    return asyncio.run(go())


def test_a_decision_is_well_formed_and_its_tokens_are_counted(servers: Config) -> None:
    """Step 3 asks both servers; what is decided is random, that it is accounted is not."""
    before = predicted_total(servers.orchestrator.port) + predicted_total(servers.math.port)
    d = _decide(servers, 3)
    after = predicted_total(servers.orchestrator.port) + predicted_total(servers.math.port)
    assert d.decided_by in ("llm", "guardrail"), d
    assert d.action in ACTIONS and 0 <= d.confidence <= 1
    assert d.calibrated_confidence is not None and 0 < d.calibrated_confidence <= 1
    meta = LLMMetadata.model_validate(d.llm_metadata)
    assert meta.math_calls and meta.orchestrator_calls
    assert meta.total_tokens_generated == after - before > 0
    assert meta.llm_reasoning_trace and not any(t.degraded for t in meta.llm_reasoning_trace)
    assert meta.llm_decision == d.action


def test_with_labelled_cases_the_decision_names_every_signal(servers: Config) -> None:
    """Issue 26 on a real llama-server: the cases vote beside the model, and the record says
    what each signal answered (the tiny model's answer is random; its shape is not)."""
    # A report no rule settles (the leakage rule would escalate "the label among the features"
    # before the model or the cases are asked).
    meta = meta_for(2, reasoning="Holdout AUC 0.97, far above every earlier run on this PRNG.")
    pool = [
        new_case(
            meta.model_copy(update={"run_id": None}),
            sha256=f"{n:064x}",
            file=f"{n}.json",
            decision=None,
            label=label,
            source="seed",
        )  # fmt: skip
        for n, label in enumerate(("escalate", "escalate", "proceed"))
    ]
    index = CaseIndex(pool, servers.policy.model_copy(update={"vote_min_cases": 1}))

    async def cases(_: PolicyConfig) -> CaseIndex:
        return index

    async def go() -> Decision:
        router = AsyncRouter(servers)
        try:
            return await Decider(servers, router, cases).decide(meta)
        finally:
            await router.aclose()

    d = asyncio.run(go())
    assert d.action in ACTIONS and d.signals["model"]["action"] in ACTIONS
    assert d.signals["cases"]["action"] == "escalate"
    assert len(d.signals["cases"]["neighbours"]) == 3 and 0 <= d.signals["support"] <= 1
    assert d.decided_by in ("llm", "cases", "guardrail")


def test_the_second_decision_reuses_the_prompt_cache(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """A fresh server: the first prompt is evaluated whole, the second only after the prefix."""
    conversation = build_messages(meta_for(1), PolicyConfig(), tuple(FINDINGS))

    async def ask(config: Config) -> list[Routed]:
        router = AsyncRouter(config)
        engine = Decider(config, router)
        try:
            return [(await engine.ask_model(meta_for(n))).routed for n in (1, 2)]
        finally:
            await router.aclose()

    with llama_server(llama_server_bin, tiny_model, tmp_path / "log") as port:
        wait_until(lambda: _ready(port), timeout=60, what="server")
        first, second = asyncio.run(ask(llm_config(free_port(), port)))
    assert first.completion.tokens_cached == 0
    # Byte-level tokens: at least the system turn and the example turns come from the cache.
    stable = sum(len(m["content"]) for m in conversation[:-1])
    assert second.completion.tokens_cached > stable
    assert second.completion.timings["prompt_n"] < first.completion.timings["prompt_n"] / 2


def _slot_tasks(port: int) -> dict[int, int | None]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/slots", timeout=5) as answer:
        # A slot that never ran a task has no id_task yet.
        return {slot["id"]: slot.get("id_task") for slot in json.loads(answer.read())}


def test_decisions_pinned_to_a_slot_leave_the_other_one_untouched(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """policy.decision_slot: every decision request (finding and explanation, two decisions)
    is served by that slot of a two-slot server; the other slot never gets a task."""

    async def decide(config: Config) -> None:
        router = AsyncRouter(config)
        try:
            for n in (1, 2):
                await Decider(config, router).decide(meta_for(n))
        finally:
            await router.aclose()

    with llama_server(llama_server_bin, tiny_model, tmp_path / "log") as port:
        wait_until(lambda: _ready(port), timeout=60, what="server")
        before = _slot_tasks(port)
        asyncio.run(decide(llm_config(port, port, policy={"decision_slot": 0})))
        after = _slot_tasks(port)
    assert set(after) == {0, 1}
    # Slot 0, not 1: left to itself this server gives a lone request slot 1.
    assert after[1] == before[1], f"slot 1 was used: {before} -> {after}"
    assert after[0] != before[0], f"slot 0 was not used: {before} -> {after}"


def test_math_prompts_reach_the_math_port(servers: Config) -> None:
    async def ask() -> tuple[Routed, Routed]:
        router = AsyncRouter(servers)
        try:
            return await router.route("compute a residue", max_tokens=8), await router.route(
                "write a summary", max_tokens=8
            )
        finally:
            await router.aclose()

    ports = servers.orchestrator.port, servers.math.port
    before = [predicted_total(p) for p in ports]
    to_math, to_orchestrator = asyncio.run(ask())
    after = [predicted_total(p) for p in ports]
    assert (to_math.endpoint, to_orchestrator.endpoint) == ("math", "orchestrator")
    assert after[1] - before[1] == to_math.completion.tokens_predicted
    assert after[0] - before[0] == to_orchestrator.completion.tokens_predicted
