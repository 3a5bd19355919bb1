"""Fourth stage: the decision record. One JSON file per file version in `decisions/`, written
atomically before the ledger settles the row: what was decided, by whom, and what came of it.
When the ledger is lost, the records rebuild it (`read_records`)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..config import DaemonSettings
from ..document.decision import Decision
from ..document.files import record_name, write_json_atomic
from ..document.pipeline import step
from ..ledger import SETTLED, Entry, State
from ..log import get_logger

__all__ = ["FORMAT", "read_records", "record_path", "write_record"]

FORMAT = "prng-llm-daemon/decision-v1"


def record_path(settings: DaemonSettings, entry: Entry) -> Path:
    """Where the decision record of `entry`'s file version lives."""
    return settings.decisions_dir / record_name(Path(entry.path), entry.sha256, "decision")


def write_record(
    settings: DaemonSettings,
    entry: Entry,
    decision: Decision,
    outcome: State,
    reason: str | None,
    *,
    agent: str | None = None,
    pid: int | None = None,
    approved_by: str = "",
) -> None:
    """Write the record of `entry` (fsync'd; blocking: call it off the event loop).

    Everything comes from the ledger entry, nothing is re-read from the file. `outcome` is the
    row's settled state: what a rebuilt ledger restores."""
    record = {
        "record": FORMAT,
        "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "result_file": str(settings.results_dir / entry.path),
        "sha256": entry.sha256,
        "run_id": entry.run_id,
        "parent_run_id": entry.parent_run_id,
        "pipeline_run": entry.root_run_id,
        "pipeline_step": entry.step,
        "pipeline_step_name": step(entry.step).name if entry.step else None,
        "decision": decision.action,
        "decided_by": decision.decided_by,
        "confidence": decision.confidence,
        "calibrated_confidence": decision.calibrated_confidence,
        "reasoning": decision.reasoning,
        "suggested_params": decision.suggested_params,
        "llm_metadata": decision.llm_metadata,
        "signals": decision.signals,
        "agent": agent,
        "pid": pid,
        "approved_by": approved_by or None,
        "outcome": outcome.value,
        "outcome_reason": reason,
    }
    write_json_atomic(record_path(settings, entry), record)


def read_records(decisions: Path) -> Iterator[tuple[str, str, State, dict[str, Any]]]:
    """What each decision record in `decisions` says about its file version: (file name,
    sha256, settled state, ledger fields). A record that cannot be read is logged and skipped."""
    for path in sorted(decisions.glob("*.decision.json")):
        try:
            yield _from_record(json.loads(path.read_bytes()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            get_logger().warning("record.unreadable", record=path.name, reason=str(exc)[:200])


def _from_record(record: dict[str, Any]) -> tuple[str, str, State, dict[str, Any]]:
    action = record["decision"]
    outcome = record.get("outcome")
    if outcome is None:  # a record from before outcomes were written: never launch again
        last = record["pipeline_step"] == 6 and action == "proceed"
        outcome = "escalated" if action == "escalate" else "done" if last else "acted"
    state = State(outcome)
    if state not in SETTLED:
        raise ValueError(f"outcome {outcome!r} is not a settled state")
    decision = Decision(
        action=action,
        confidence=record["confidence"],
        calibrated_confidence=record["calibrated_confidence"],
        reasoning=record["reasoning"],
        suggested_params=record["suggested_params"],
        # Records written before the field had this name call it `policy_path`.
        decided_by=record.get("decided_by") or record["policy_path"],
        llm_metadata=record["llm_metadata"],
        signals=record.get("signals") or {},  # none in records from before issue 26
    )
    fields = {
        "run_id": record["run_id"],
        "parent_run_id": record["parent_run_id"],
        "root_run_id": record["pipeline_run"],
        "step": record["pipeline_step"],
        "reason": record.get("outcome_reason") or "restored from its decision record",
        "decision": decision,
        "action": action,
        "agent": record["agent"],
        "pid": record["pid"],
        # Its agent, if any, belongs to the old ledger: not one to watch or report lost.
        "ended": time.time() if record["pid"] else None,
    }
    return Path(record["result_file"]).name, str(record["sha256"]), state, fields
