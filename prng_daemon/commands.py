"""Operator commands (approve, approve-retry, reject): the CLI queues one in the ledger and
waits for the answer; the daemon's command loop applies it to the escalated rows."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

from structlog.typing import FilteringBoundLogger

from .document.pipeline import step
from .engine import Engine
from .errors import ResultRejected
from .handlers.act.plan import agent_for
from .handlers.record import write_record
from .ledger import Entry, Ledger, State
from .log import get_logger

__all__ = ["COMMAND_WAIT_SECONDS", "Commands", "wait_for_answer"]

COMMAND_POLL_SECONDS = 1.0
"""How often the daemon looks for queued commands."""
COMMAND_WAIT_SECONDS = 10.0
"""How long approve/reject wait for the running daemon's answer (it polls every second)."""
ANSWER_POLL_SECONDS = 0.1

log = get_logger()


class Commands:
    """The daemon's side: commands found in the ledger, applied through the engine, answered."""

    def __init__(self, engine: Engine, on_change: Callable[[], None] = lambda: None) -> None:
        self._engine = engine
        self._on_change = on_change

    async def serve(self, beat: Callable[[], None], between: Callable[[], Awaitable[None]]) -> None:
        """The daemon's command loop: apply every queued command, then `between` (the daemon's
        reload, so that one never runs beside a command), then wait a poll; `beat` each round."""
        while True:
            beat()
            for command_id, run_id, verb in self._engine.ledger.pending_commands():
                await self.apply(command_id, run_id, verb)
            await between()
            await asyncio.sleep(COMMAND_POLL_SECONDS)

    async def apply(self, command_id: int, run_id: str, verb: str) -> None:
        """Answer one operator command, whatever happens: it is never left to be replayed."""
        clog = log.bind(run_id=run_id, command=verb)
        try:
            applied, message = await self.resolve(run_id, verb)
        except Exception as exc:
            clog.exception("command.crashed", error=repr(exc))
            outcome, message = "crashed", f"internal error (see the daemon's log): {exc!r}"
        else:
            outcome = "applied" if applied else "refused"
            (clog.info if applied else clog.warning)(f"command.{outcome}", message=message)
        self._engine.ledger.finish_command(command_id, outcome, message)
        self._on_change()

    async def resolve(self, run_id: str, verb: str) -> tuple[bool, str]:
        """Apply `approve`, `approve-retry` or `reject` to every pending escalation of `run_id`
        (the same content under several names is several escalations of one run id).

        Returns (applied to all, one line for the operator: `approved: RUN -> started AGENT`).
        Never raises for what operators and files do: a file deleted, changed or made invalid
        since, an agent no longer configured leave that escalation pending, with the reason in
        the message, to be approved once fixed or rejected (which always works).
        """
        log = get_logger(run_id=run_id, command=verb)
        if verb not in _RESOLVED:
            return False, f"{run_id}: unknown command {verb!r}"
        entries = self._engine.ledger.escalated(run_id)
        if not entries:
            latest = self._engine.ledger.by_run_id(run_id)
            state = latest.state.value if latest else "unknown"
            log.warning("escalation.unknown", state=state)
            return False, f"{run_id}: no pending escalation (state: {state})"
        done: list[tuple[str, str]] = []
        pending: list[tuple[str, str]] = []
        for entry in entries:
            if self._engine.in_flight(entry.path):
                pending.append((entry.path, "being processed, try again"))
                continue
            with self._engine.holding(entry.path):
                ok, what = await self._resolve_one(entry, verb, log)
            if not ok:
                log.warning("escalation.kept", file=entry.path, reason=what)
            (done if ok else pending).append((entry.path, what))
        self._on_change()

        def listed(items: list[tuple[str, str]]) -> str:
            if len(entries) == 1:
                return items[0][1]
            return "; ".join(f"{name}: {what}" for name, what in items)

        if not pending:
            return True, f"{_RESOLVED[verb]}: {run_id} -> {listed(done)}"
        message = f"{run_id}: still escalated: {listed(pending)}"
        if done:
            message += f"; {_RESOLVED[verb]}: {listed(done)}"
        return False, message

    async def _resolve_one(
        self, entry: Entry, verb: str, log: FilteringBoundLogger
    ) -> tuple[bool, str]:
        """Resolve one escalated row: (True, what happened) or (False, why it stays escalated)."""
        if entry.decision is None or entry.step is None:
            return False, "it has no recorded decision to act on; reject it"
        decision = entry.decision
        engine = self._engine
        settings = engine.config.daemon
        path = settings.results_dir / entry.path
        try:
            if verb == "reject":
                reason = "rejected by operator"
                await asyncio.to_thread(write_record, settings, entry, decision, State.DONE, reason)
                engine.ledger.update(entry, State.DONE, reason=reason)
                log.info("escalation.rejected", file=entry.path)
                return True, "stops here"
            action = "retry" if verb == "approve-retry" else "proceed"
            row = step(entry.step)
            agent = agent_for(row, action)
            if not (action == "proceed" and row.is_last) and agent not in engine.config.agents:
                return False, f"agent {agent} is not configured"
            loaded = await engine.load(
                path, max_bytes=settings.max_result_bytes, root=settings.results_dir
            )
            if loaded.sha256 != entry.sha256:
                return False, "the result file changed since it was escalated"
            decision = decision.model_copy(update={"action": action, "decided_by": "operator"})
            entry = engine.ledger.update(entry, entry.state, decision=decision, action=action)
            log.info("escalation.approved", file=entry.path, decision=action)
            await engine.act(entry, loaded, decision, log, "operator")
        except ResultRejected as exc:
            if not os.path.lexists(path):
                return False, "the result file was deleted since it was escalated"
            return False, f"the result file cannot be used: {exc}"
        except OSError as exc:  # a full disk: a launch intent is resumed by the sweep
            return False, f"cannot act on it now: {exc.strerror or exc}"
        after = engine.ledger.get(entry.id)
        if after.state is State.DONE:
            return True, "pipeline run complete"
        if after.state is State.FAILED:
            return True, f"{agent} could not start: {after.reason}"
        if after.state is State.ESCALATED:  # e.g. its agent vanished between check and launch
            return True, f"escalated again: {after.reason}"
        return True, f"started {agent}"


_RESOLVED = {"approve": "approved", "approve-retry": "approved for a retry", "reject": "rejected"}


def wait_for_answer(ledger: Ledger, command_id: int) -> tuple[str, str] | None:
    """The running daemon's (outcome, message) for the command, or None at the deadline."""
    deadline = time.monotonic() + COMMAND_WAIT_SECONDS
    while (answer := ledger.command_outcome(command_id)) is None:
        if time.monotonic() > deadline:
            return None
        time.sleep(ANSWER_POLL_SECONDS)
    return answer
