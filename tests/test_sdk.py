"""The agent SDK: run ids, launch context, validated atomic results, BaseAgent over the router."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from prng_daemon.document.metadata import RUN_ID_PATTERN
from prng_daemon.errors import LLMBadAnswer, ResultRejected
from prng_daemon.handlers.validate import load_result
from prng_daemon.llm.router import LLMRouter
from prng_daemon.sdk import BaseAgent, RunContext, new_run_id, write_result

from .fake_llama import FakeLlama, llm_config


def test_run_ids_have_the_v103_shape() -> None:
    run_id = new_run_id(3, datetime(2025, 12, 1, 14, 30, 22, tzinfo=UTC))
    assert re.fullmatch(RUN_ID_PATTERN, run_id)
    assert run_id.startswith("step3_20251201_143022_")
    assert new_run_id(3) != new_run_id(3)


def test_context_comes_from_the_daemons_environment(tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"threshold": 0.012}))
    context = RunContext.from_env(
        {
            "PRNG_STEP": "3",
            "PRNG_PARENT_RUN_ID": "step2_20251201_143022_abc123",
            "PRNG_RETRY_COUNT": "1",
            "PRNG_PARAMS_FILE": str(params),
            "PRNG_RESULTS_DIR": str(tmp_path),
        }
    )
    assert (context.step, context.retry_count) == (3, 1)
    assert context.parent_run_id == "step2_20251201_143022_abc123"
    assert context.params == {"threshold": 0.012}
    assert context.run_id.startswith("step3_")


def test_write_result_writes_a_valid_file_atomically(tmp_path: Path) -> None:
    context = RunContext(step=2, results_dir=tmp_path, run_id=new_run_id(2),
                         parent_run_id="step1_20251201_143022_abc123")  # fmt: skip
    path = write_result(
        tmp_path, context, {"confidence": 0.8, "success_criteria_met": True}, {"score": 1}
    )
    assert path == tmp_path / f"{context.run_id}.json"
    meta = load_result(path).document.agent_metadata
    assert meta.follow_up_agent == "full_scoring_agent" and meta.parent_run_id
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temp file left behind"


def test_write_result_refuses_invalid_metadata_and_writes_nothing(tmp_path: Path) -> None:
    context = RunContext(step=2, results_dir=tmp_path, run_id=new_run_id(2))
    with pytest.raises(ResultRejected) as info:
        write_result(tmp_path, context, {"confidence": 7, "success_criteria_met": True}, {})
    assert info.value.pointer == "/agent_metadata/confidence"
    assert list(tmp_path.iterdir()) == []


def test_base_agent_reasons_over_the_router_and_accounts_for_it(fake: FakeLlama) -> None:
    with LLMRouter(llm_config(fake.port, fake.port)) as router:
        agent = BaseAgent(router)
        assert agent.think("compute the residue distribution")
        assert agent.calculate("chi-squared of these counts")
        with pytest.raises(LLMBadAnswer):
            fake.mode = "garbage"
            agent.plan("score the survivors")
        result = agent.finalize_run({"agent_metadata": {}})
    llm = result["agent_metadata"]["llm_metadata"]
    assert llm["math_calls"] == 2 and llm["orchestrator_calls"] == 1
    assert len(llm["llm_reasoning_trace"]) == 3
    assert router_metrics_reset(router)


def router_metrics_reset(router: LLMRouter) -> bool:
    return bool(router.get_llm_metadata()["math_calls"] == 0)
