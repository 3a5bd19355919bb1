"""The agent SDK: what a pipeline agent uses to read its launch and write its result.

Proposal §3.5 and v1.0.3's run manager / metadata writer: run ids, the parent-run chain,
`write_result()` that validates and writes atomically, and `BaseAgent` over the LLM router.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .document.files import write_json_atomic
from .document.metadata import SCHEMA_VERSION, ResultFile
from .document.pipeline import step
from .errors import LLMBadAnswer, ResultRejected
from .handlers.validate import schema_problems
from .llm.router import LLMRouter, get_router

__all__ = ["BaseAgent", "RunContext", "new_run_id", "write_result"]


def new_run_id(step_number: int, now: datetime | None = None) -> str:
    """`step{N}_{YYYYMMDD}_{HHMMSS}_{6 hex}`."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d_%H%M%S")
    return f"step{step_number}_{stamp}_{secrets.token_hex(3)}"


@dataclass(frozen=True)
class RunContext:
    """What the daemon told this agent run through its environment (PRNG_*)."""

    step: int
    parent_run_id: str | None = None
    retry_count: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    results_dir: Path = Path(".")
    run_id: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, step: int = 1) -> RunContext:
        env = os.environ if environ is None else environ
        params: dict[str, Any] = {}
        if env.get("PRNG_PARAMS_FILE"):
            params = json.loads(Path(env["PRNG_PARAMS_FILE"]).read_text())
        number = int(env.get("PRNG_STEP") or step)
        return cls(
            step=number,
            parent_run_id=env.get("PRNG_PARENT_RUN_ID") or None,
            retry_count=int(env.get("PRNG_RETRY_COUNT") or 0),
            params=params,
            results_dir=Path(env.get("PRNG_RESULTS_DIR") or "."),
            run_id=new_run_id(number),
        )


def write_result(
    results_dir: Path, context: RunContext, metadata: Mapping[str, Any], payload: Mapping[str, Any]
) -> Path:
    """Validate and write `{run_id}.json` atomically (temp file + rename) into `results_dir`.

    `metadata` holds what the agent knows (confidence, success_criteria_met, reasoning,
    suggested_params, ...); the step, names, run ids and retry count come from `context`.
    """
    row = step(context.step)
    meta = {
        "run_id": context.run_id,
        "parent_run_id": context.parent_run_id,
        "pipeline_step": row.number,
        "pipeline_step_name": row.name,
        "follow_up_agent": row.follow_up_agent,
        "retry_count": context.retry_count,
        **metadata,
    }
    document = {**payload, "schema_version": SCHEMA_VERSION, "agent_metadata": meta}
    problems = schema_problems(document)
    if problems:
        pointer, message = problems[0]
        raise ResultRejected(message, pointer, problems)
    ResultFile.model_validate(document)
    return write_json_atomic(results_dir / f"{context.run_id}.json", document)


class BaseAgent:
    """Helpers for an agent's reasoning over the two LLMs (proposal §3.5)."""

    def __init__(self, router: LLMRouter | None = None) -> None:
        self.llm = router or get_router()

    def think(self, context: str) -> str:
        """Let the router pick the model by the prompt's content."""
        return self.llm.route(context)

    def calculate(self, math_query: str) -> str:
        return self.llm.calculate(math_query)

    def plan(self, task_description: str) -> dict[str, Any]:
        """Ask the orchestrator for a JSON plan; an answer that is not a JSON object is an error."""
        answer = self.llm.orchestrate(
            "Create a JSON execution plan for the following task:\n"
            f"{task_description}\n"
            "Return ONLY valid JSON with keys: steps, parameters, expected_outputs"
        )
        try:
            plan = json.loads(answer)
        except ValueError:
            plan = None
        if not isinstance(plan, dict):
            raise LLMBadAnswer(
                f"plan: the orchestrator did not answer a JSON object: {answer[:80]!r}"
            )
        return plan

    def finalize_run(self, result: dict[str, Any]) -> dict[str, Any]:
        """Put this run's llm_metadata into the result and start counting afresh."""
        result.setdefault("agent_metadata", {})["llm_metadata"] = self.llm.get_llm_metadata()
        self.llm.reset_metrics()
        return result
