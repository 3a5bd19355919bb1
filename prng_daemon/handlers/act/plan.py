"""What a decision launches: which agent, with which placeholders and params file; plain
functions of the ledger row, the loaded result and the decision (the engine carries them out)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from ...config import AgentConfig, DaemonSettings
from ...document.decision import Decision
from ...document.files import record_name, write_json_atomic
from ...document.pipeline import Step
from ...ledger import Entry
from ..record import record_path
from ..validate import Loaded
from .launcher import AgentRun, Launch, launch_key

__all__ = ["agent_for", "agent_run", "derived_run_id", "launch_for"]


def agent_for(row: Step, action: str) -> str:
    """The agent a decision on `row` starts: the step again on retry, else the follow-up."""
    return row.agent if action == "retry" else row.follow_up_agent


def launch_for(
    settings: DaemonSettings,
    entry: Entry,
    loaded: Loaded,
    decision: Decision,
    agent: AgentConfig,
    retry: bool,
) -> Launch:
    path, sha256, meta = loaded.path, loaded.sha256, loaded.document.agent_metadata
    decisions = settings.decisions_dir
    params_file = decisions / record_name(path, sha256, "params")
    params = decision.suggested_params
    write_json_atomic(params_file, params, durable=False)
    run_id = entry.run_id or ""
    values = {
        "parent_run_id": (meta.parent_run_id or "") if retry else run_id,
        "step": str(meta.pipeline_step if retry else meta.pipeline_step + 1),
        "retry_count": str(meta.retries + 1 if retry else 0),
        "params_file": str(params_file),
        "result_file": str(path),
        "results_dir": str(settings.results_dir),
        "decision": decision.action,
        "decision_file": str(record_path(settings, entry)),
    }
    return Launch(agent_run(entry), agent, values)


def agent_run(entry: Entry) -> AgentRun:
    """The launch of a ledger row (one in LAUNCHING or later, so its agent is known)."""
    assert entry.agent is not None
    return AgentRun(entry.id, launch_key(entry.path, entry.sha256), entry.run_id or "", entry.agent)


def derived_run_id(path: Path, step_number: int, sha256: str) -> str:
    """A stable run id for a result that carries none: its step, mtime and content hash."""
    stamp = datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%Y%m%d_%H%M%S")
    return f"step{step_number}_{stamp}_{sha256[:6]}"
