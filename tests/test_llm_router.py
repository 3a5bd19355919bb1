"""AsyncRouter / LLMRouter with two fake servers: keyword routing, fallback, metrics, get_router."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import prng_daemon.llm.router as router_module
from prng_daemon.config import Config
from prng_daemon.document.metadata import LLMMetadata
from prng_daemon.errors import LLMUnavailable
from prng_daemon.llm import AsyncRouter, LLMRouter, Routed, get_router
from prng_daemon.llm.router import classify_query

from .fake_llama import FakeLlama, llm_config
from .helpers import free_port


@pytest.fixture
def fakes() -> Iterator[tuple[FakeLlama, FakeLlama]]:
    with FakeLlama() as orchestrator, FakeLlama() as math:
        yield orchestrator, math


def _config(fakes: tuple[FakeLlama, FakeLlama], **sections: dict[str, Any]) -> Config:
    return llm_config(fakes[0].port, fakes[1].port, **sections)


def _run(config: Config, use: Callable[[AsyncRouter], Any], **kw: Any) -> Any:
    async def go() -> Any:
        r = AsyncRouter(config, **kw)
        try:
            return await use(r)
        finally:
            await r.aclose()

    return asyncio.run(go())


def test_math_keywords_go_to_the_math_specialist(fakes: tuple[FakeLlama, FakeLlama]) -> None:
    orchestrator, math = fakes

    async def use(r: AsyncRouter) -> list[Routed]:
        return [
            await r.route("Compute the residue distribution"),
            await r.route("Write a short summary"),
            await r.route("Write a summary", force_endpoint="math"),
        ]

    to_math, to_orchestrator, forced = _run(_config(fakes), use)
    assert (to_math.endpoint, to_orchestrator.endpoint, forced.endpoint) == (
        "math",
        "orchestrator",
        "math",
    )
    assert [b["prompt"] for b in math.requests] == [
        "Compute the residue distribution",
        "Write a summary",
    ]
    assert [b["prompt"] for b in orchestrator.requests] == ["Write a short summary"]
    assert not any(x.degraded for x in (to_math, to_orchestrator, forced))


def test_configured_keywords_replace_the_defaults(fakes: tuple[FakeLlama, FakeLlama]) -> None:
    config = _config(fakes, routing={"math_keywords": ["eigenvalue"]})

    async def use(r: AsyncRouter) -> list[str]:
        return [(await r.route(p)).endpoint for p in ("an EIGENVALUE problem", "residue")]

    assert _run(config, use) == ["math", "orchestrator"]


@pytest.mark.parametrize(
    ("prompt", "query_type"),
    [
        ("residue mod 8", "residue_analysis"),
        ("find the seed", "prng_state"),
        ("how much confidence", "statistical"),
        ("make a JSON config", "config_generation"),
        ("plan the next step", "orchestration"),
        ("hello", "general"),
    ],
)
def test_queries_are_classified_as_the_proposal_does(prompt: str, query_type: str) -> None:
    assert classify_query(prompt) == query_type


def test_metrics_become_schema_llm_metadata(fakes: tuple[FakeLlama, FakeLlama]) -> None:
    async def use(r: AsyncRouter) -> tuple[dict[str, Any], dict[str, Any]]:
        for i in range(11):
            await r.route(f"seed question {i}")
        await r.orchestrate("plan the next step")
        before = r.get_llm_metadata()
        r.reset_metrics()
        return before, r.get_llm_metadata()

    meta, after = _run(_config(fakes), use)
    LLMMetadata.model_validate(meta)
    assert meta["orchestrator_model"] == "orchestrator-model"
    assert (meta["math_calls"], meta["orchestrator_calls"]) == (11, 1)
    trace = meta["llm_reasoning_trace"]
    assert len(trace) == 10
    assert trace[-1]["model"] == "orchestrator" and trace[-1]["query_type"] == "orchestration"
    assert trace[0]["query_type"] == "prng_state" and trace[0]["degraded"] is False
    assert all(isinstance(t["latency_ms"], int) and t["tokens"] > 0 for t in trace)
    assert meta["total_tokens_generated"] == 12 * trace[0]["tokens"]
    assert (after["math_calls"], after["total_tokens_generated"], after["llm_reasoning_trace"]) == (
        0,
        0,
        [],
    )


def _math_failing(fakes: tuple[FakeLlama, FakeLlama], fault: str) -> Config:
    """A config whose math server is `fault`: "down" (nothing on its port), or a fake's mode."""
    orchestrator, math = fakes
    math_port = free_port() if fault == "down" else math.port
    math.mode = fault
    return llm_config(orchestrator.port, math_port, routing={"request_timeout_seconds": 0.5})


@pytest.mark.parametrize("fault", ["down", "loading", "hang"])
def test_the_other_server_answers_when_the_chosen_one_cannot(
    fakes: tuple[FakeLlama, FakeLlama], fault: str
) -> None:
    config = _math_failing(fakes, fault)

    async def use(r: AsyncRouter) -> tuple[Routed, dict[str, Any]]:
        return await r.route("compute the entropy"), r.get_llm_metadata()

    routed, meta = _run(config, use)
    assert (routed.wanted, routed.endpoint, routed.degraded) == ("math", "orchestrator", True)
    assert meta["llm_reasoning_trace"][0]["degraded"] is True
    assert meta["orchestrator_calls"] == 1 and meta["math_calls"] == 0


def test_a_child_the_supervisor_calls_unready_is_not_asked(
    fakes: tuple[FakeLlama, FakeLlama],
) -> None:
    orchestrator, math = fakes

    async def use(r: AsyncRouter) -> Routed:
        return await r.route("compute the entropy")

    routed = _run(_config(fakes), use, is_ready=lambda name: name == "orchestrator")
    assert routed.degraded and routed.endpoint == "orchestrator"
    assert math.requests == []


def test_neither_server_answering_is_unavailable() -> None:
    config = llm_config(free_port(), free_port())

    async def use(r: AsyncRouter) -> Routed:
        return await r.route("anything")

    with pytest.raises(LLMUnavailable, match="orchestrator: not ready; math: not ready"):
        _run(config, use)


def test_health_check_reports_each_server(fakes: tuple[FakeLlama, FakeLlama]) -> None:
    fakes[1].mode = "loading"

    async def use(r: AsyncRouter) -> dict[str, bool]:
        return await r.health_check()

    assert _run(_config(fakes), use) == {"orchestrator": True, "math": False}


def test_unknown_endpoint_is_refused(fakes: tuple[FakeLlama, FakeLlama]) -> None:
    async def use(r: AsyncRouter) -> Routed:
        return await r.route("x", force_endpoint="gpu2")

    with pytest.raises(ValueError, match="force_endpoint"):
        _run(_config(fakes), use)


def test_agents_use_the_blocking_router_as_the_proposal_shows(
    fakes: tuple[FakeLlama, FakeLlama], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """§3.5: `get_router()` once, then route/calculate/orchestrate return the text."""
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "orchestrator": {"model": "o.gguf", "port": fakes[0].port},
                "math": {"model": "m.gguf", "port": fakes[1].port},
                "daemon": {"state_dir": str(tmp_path / "state")},
            }
        )
    )
    monkeypatch.setenv("PRNG_DAEMON_CONFIG", str(path))
    monkeypatch.setattr(router_module, "_instance", None)
    llm = get_router()
    try:
        assert get_router() is llm
        answer = json.loads(llm.route("think about the next step"))
        assert answer["decision"] == "proceed"
        llm.calculate("2 + 2")
        llm.orchestrate("plan")
        assert llm.health_check() == {"orchestrator": True, "math": True}
        meta = llm.get_llm_metadata()
        assert (meta["orchestrator_calls"], meta["math_calls"]) == (2, 1)
        llm.reset_metrics()
        assert llm.get_llm_metadata()["orchestrator_calls"] == 0
    finally:
        llm.close()
    assert get_router() is not llm
    get_router().close()


def test_blocking_router_closes_once_and_then_refuses(fakes: tuple[FakeLlama, FakeLlama]) -> None:
    with LLMRouter(_config(fakes)) as llm:
        llm.route("hello")
    llm.close()
    with pytest.raises(RuntimeError, match="closed"):
        llm.route("hello")


@pytest.mark.parametrize("fault", ["down", "loading", "hang"])
def test_the_blocking_router_falls_back_and_accounts_as_the_async_one(
    fakes: tuple[FakeLlama, FakeLlama], fault: str
) -> None:
    with LLMRouter(_math_failing(fakes, fault)) as llm:
        assert json.loads(llm.calculate("2 + 2"))["decision"] == "proceed"
        meta = llm.get_llm_metadata()
    assert (meta["orchestrator_calls"], meta["math_calls"]) == (1, 0)
    assert meta["llm_reasoning_trace"][0]["degraded"] is True
    assert len(fakes[0].requests) == 1


def test_the_blocking_router_says_why_neither_server_answered(
    fakes: tuple[FakeLlama, FakeLlama],
) -> None:
    orchestrator, math = fakes
    orchestrator.mode = "hang"
    config = llm_config(orchestrator.port, free_port(), routing={"request_timeout_seconds": 0.3})
    with LLMRouter(config) as llm, pytest.raises(LLMUnavailable) as info:
        llm.orchestrate("plan")
    assert str(info.value).endswith(
        f"orchestrator: http://127.0.0.1:{orchestrator.port}/completion: no complete answer"
        " within 0.3s; math: not ready"
    )


def test_an_agent_may_ask_the_blocking_router_from_inside_an_event_loop(
    fakes: tuple[FakeLlama, FakeLlama],
) -> None:
    """An agent written with asyncio (or run in Jupyter) calls it from a running loop: it
    blocks that loop for the answer, and answers."""

    async def agent(llm: LLMRouter) -> str:
        return llm.route("think about the next step")

    with LLMRouter(_config(fakes)) as llm:
        answer = asyncio.run(agent(llm))
    assert json.loads(answer)["decision"] == "proceed"
