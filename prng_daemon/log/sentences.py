"""The journal's MESSAGE: one short sentence a person scans in `journalctl -u prng-llm-daemon`.

The facts stay in the entry's fields (RUN_ID=, STEP=, FILE=, EVENT=, ...) for filtering and
`-o json`; the sentence only says them in words. The events a person follows a file or a server
by have a template; every other event reads `event key=value ...`. Everything that came from a
file (names, reasons quoting it) goes through `printable`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..document.names import printable
from ..document.pipeline import PIPELINE

__all__ = ["sentence"]

Facts = Mapping[str, Any]

_HIDDEN = frozenset({"event", "level", "timestamp", "exception"})
"""Not facts of the sentence: the event names it, the priority and the journal carry the rest
(a traceback is its own EXCEPTION field)."""


def _step(facts: Facts) -> str:
    """`step 3/6 full_scoring`, or the file, or the run id: what the sentence is about."""
    number = facts.get("step")
    if isinstance(number, int) and 1 <= number <= len(PIPELINE):
        return f"step {number}/{len(PIPELINE)} {PIPELINE[number - 1].name}"
    return str(facts.get("file") or facts.get("run_id") or "?")


def _percent(value: Any) -> str:
    return f"{round(float(value) * 100)} %" if isinstance(value, int | float) else "?"


def _decision(f: Facts) -> str:
    return f"{_step(f)}: {f['decision']} ({f['decided_by']}, {_percent(f.get('confidence'))})"


def _agent_started(f: Facts) -> str:
    where = f.get("started_as") or f"pid {f.get('pid')}"
    return f"{_step(f)}: {f['decision']} -> {f['agent']} started as {where}"


def _agent_exited(f: Facts) -> str:
    code = f.get("exit_code")
    if code is None:
        how = "ended, exit status unknown"
    elif code < 0:
        how = f"was killed by signal {-code}"
    else:
        how = "succeeded" if code == 0 else f"failed (exit {code})"
    if f.get("job_state"):
        how = f"ended: Slurm job {f['pid']} {f['job_state']} (exit {code})"
    return f"{_step(f)}: {f['agent']} {how} after {f['duration_s']} s"


def _plain(text: str) -> Callable[[Facts], str]:
    """`text` with the event's facts filled in by name (one missing: KeyError, the generic form)."""
    return lambda f: text.format_map(f)


def _template(text: str) -> Callable[[Facts], str]:
    """`text` about a result file: after its step (`step 3/6 full_scoring: `)."""
    return lambda f: f"{_step(f)}: " + text.format_map(f)


_TEMPLATES: dict[str, Callable[[Facts], str]] = {
    "result.validated": _template("{file} validated, run {run_id}"),
    "result.rejected": _plain("{file} rejected: {reason} (at {pointer})"),
    "result.changed": _template("{file} changed after it was decided: {reason}"),
    "decision.made": _decision,
    "decision.waiting": _template("waiting for the LLMs: {reason}"),
    "decision.escalated": _template("escalated to the operator: {reason}"),
    "pipeline.completed": _template("pipeline run {pipeline_run} complete"),
    "agent.started": _agent_started,
    "agent.failed": _template("{agent} could not start: {reason}"),
    "agent.exited": _agent_exited,
    "agent.lost": _template("{agent} lost: {reason}"),
    "launcher.selected": _plain("agents start with the {launcher} launcher: {reason}"),
    "agent.adopted": _template("{agent} still running after the restart, adopted"),
    "agent.never_started": lambda f: (
        f"{_step(f)}: {f['agent']}: {f['reason']}" + (f"; {f['action']}" if f.get("action") else "")
    ),
    "result.retry_later": _plain("{file} waits for a passing fault: {error}; {action}"),
    "escalation.approved": _template("escalation approved by the operator: {decision}"),
    "escalation.rejected": _template("escalation rejected by the operator: the run stops here"),
    "escalation.kept": _template("escalation still pending: {reason}"),
    "escalation.unknown": _plain("{run_id}: no pending escalation ({state})"),
    "command.applied": _plain("operator: {message}"),
    "command.refused": _plain("operator command refused: {message}"),
    "server.ready": _plain("llama-server {server} ready on port {port} (pid {pid})"),
    "server.failed": _plain("llama-server {server} failed: {reason}"),
    "server.exited": _plain("llama-server {server} (pid {pid}) {reason} ({exit})"),
    "server.restarting": _plain("llama-server {server} restarting in {delay_s} s: {reason}"),
    "server.safe_mode": _plain("llama-server {server} {reason}"),
    "server.unhealthy": _plain("llama-server {server} unhealthy: {problem}"),
    "task.crashed": _plain("task {task} crashed ({crashes}x): {error}"),
    "task.gave_up": _plain("task {task} gave up after {crashes} crashes"),
    "watchdog.withheld": lambda f: f"watchdog ping withheld: {'; '.join(map(str, f['problems']))}",
    "daemon.started": _plain("daemon started, watching {results_dir}"),
    "daemon.stopping": _plain("daemon stopping"),
    "daemon.stopped": _plain("daemon stopped (exit {exit_code})"),
}


def _generic(event: str, facts: Facts) -> str:
    return " ".join([event, *(f"{key}={value}" for key, value in facts.items())])


def sentence(event_dict: Facts) -> str:
    """The MESSAGE of one structlog event; never raises (a template that cannot be filled falls
    back to `event key=value ...`)."""
    event = str(event_dict.get("event", ""))
    facts = {k: v for k, v in event_dict.items() if k not in _HIDDEN and v is not None}
    template = _TEMPLATES.get(event)
    try:
        text = template(facts) if template is not None else _generic(event, facts)
    except Exception:  # noqa: BLE001 - a missing or odd fact must not lose the entry
        text = _generic(event, facts)
    return printable(text)
