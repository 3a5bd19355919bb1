"""One result file through the pipeline: validate → decide → act → record, exactly once.

The ledger is consulted before any work and written at every step, so a crash at any point
is reconciled at the next start: never a second launch, never a lost one.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import Config
from .errors import AgentFailed, LLMUnavailable, ResultRejected
from .handlers.act import Launch, Launcher, OnExit
from .handlers.record import record_name, write_json_atomic
from .handlers.validate import Loaded, load_result
from .ledger import Entry, Ledger, State
from .llm.decision import Decision
from .log import get_logger
from .metadata import AgentMetadata
from .pipeline import step

__all__ = ["Engine", "Source"]

Decider = Callable[[AgentMetadata], Awaitable[Decision]]
Source = str
"""Why a path is looked at: "closed", "moved", "scan" or "retry"."""

RESUMABLE = (State.SEEN, State.DECIDED, State.WAITING)
"""States a file is left in when the daemon stopped (or no LLM answered) mid-way."""

ADOPTED_TIMEOUT_SECONDS = 24 * 3600.0
"""Timeout for an adopted agent whose name is no longer in the config."""

SETTLE_SECONDS = 60.0
"""A file found by a scan that does not parse yet, and changed this recently, may still be
being written (NFS, a slow copy): it is left for later instead of quarantined."""


class Engine:
    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        decide: Decider,
        launcher_factory: Callable[[OnExit], Launcher],
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self._decide = decide
        self.launcher = launcher_factory(self._agent_exited)
        self._on_change = on_change
        self._run_locks: dict[str, asyncio.Lock] = {}
        self._busy: set[str] = set()
        self.current: str = "idle"
        """What the engine is doing now, for STATUS= and `status`."""

    # -- the pipeline ---------------------------------------------------------------------

    async def process(self, path: Path, source: Source) -> bool:
        """Take one result file as far as it can go; every outcome is in the ledger.

        False when the same path is being processed already: the caller tries again later.
        """
        if path.name in self._busy:
            return False
        self._busy.add(path.name)
        try:
            await self._process(path, source)
        finally:
            self._busy.discard(path.name)
        return True

    async def _process(self, path: Path, source: Source) -> None:
        settings = self.config.daemon
        rel = path.name
        log = get_logger(file=rel)
        try:
            loaded = load_result(
                path,
                max_bytes=settings.max_result_bytes,
                root=settings.results_dir,
                allowed_agents=self.config.agents.keys(),
            )
        except ResultRejected as exc:
            self._reject(path, exc, source, log)
            return
        meta = loaded.document.agent_metadata
        run_id = meta.run_id or derived_run_id(path, meta.pipeline_step, loaded.sha256)
        root = self.ledger.root_of(meta.parent_run_id) or run_id
        entry, new = self.ledger.claim(
            rel,
            loaded.sha256,
            run_id=run_id,
            parent_run_id=meta.parent_run_id,
            root_run_id=root,
            step=meta.pipeline_step,
        )
        if not new and entry.state not in RESUMABLE:
            return
        if entry.state is State.CHANGED:
            log.warning("result.changed", reason=entry.reason, sha256=loaded.sha256)
            self._on_change()
            return
        log = log.bind(run_id=run_id, step=meta.pipeline_step)
        log.info("result.validated", source=source, sha256=loaded.sha256, pipeline_run=root)
        lock = self._run_locks.setdefault(root, asyncio.Lock())
        async with lock:
            if entry.decision is not None:  # decided before a crash: act on it, never re-decide
                await self.act(entry, loaded, Decision.model_validate(entry.decision), log)
            else:
                await self._decide_and_act(entry, loaded, log)
        if not lock.locked():
            self._run_locks.pop(root, None)

    def _reject(self, path: Path, exc: ResultRejected, source: Source, log: Any) -> None:
        if exc.maybe_partial and source == "scan" and _recently_changed(path):
            log.debug("result.incomplete", reason=str(exc))
            return
        entry, new = self.ledger.claim(path.name, _rejected_key(path))
        if not new:
            return
        self.ledger.update(entry.id, State.QUARANTINED, reason=str(exc))
        log.error("result.rejected", reason=exc.reason, pointer=exc.pointer or "/", source=source)
        self._on_change()

    async def _decide_and_act(self, entry: Entry, loaded: Loaded, log: Any) -> None:
        meta = loaded.document.agent_metadata
        row = step(meta.pipeline_step)
        self.current = f"step {row.number}/6 {row.name}: deciding"
        self._on_change()
        try:
            decision = await self._decide(meta)
        except LLMUnavailable as exc:
            self.ledger.update(entry.id, State.WAITING, reason=str(exc))
            log.warning("decision.waiting", reason=str(exc))
            self.current = "idle"
            self._on_change()
            return
        log.info(
            "decision.made",
            decision=decision.action,
            path=decision.path,
            confidence=decision.confidence,
            calibrated_confidence=decision.calibrated_confidence,
        )
        entry = self.ledger.update(
            entry.id, State.DECIDED, decision=decision.model_dump(mode="json"),
            action=decision.action,
        )  # fmt: skip
        await self.act(entry, loaded, decision, log)
        self.current = "idle"
        self._on_change()

    async def act(
        self, entry: Entry, loaded: Loaded, decision: Decision, log: Any, approved_by: str = ""
    ) -> None:
        """Carry out a decision: launch, escalate or finish the pipeline run; record it.

        The decision record is written before the final ledger state, so a crash in between
        leaves a state that is resumed (or reconciled) and the record rewritten, never missing.
        """
        row = step(loaded.document.agent_metadata.pipeline_step)
        pid: int | None = None
        agent: str | None = None
        if decision.action == "escalate":
            final, reason = State.ESCALATED, decision.reasoning[:500]
            log.warning("decision.escalated", reason=decision.reasoning[:200])
        elif decision.action == "proceed" and row.is_last:
            final, reason = State.DONE, "pipeline run complete"
            log.info("pipeline.completed", pipeline_run=entry.root_run_id)
        else:
            retry = decision.action == "retry"
            agent = row.agent if retry else row.follow_up_agent
            launch = self._launch_for(entry, loaded, decision, agent, retry)
            # The intent goes to the ledger first; the launcher's marker makes the spawn itself
            # idempotent, so the crash window between the two cannot cause a second launch.
            self.ledger.update(entry.id, State.LAUNCHING, agent=agent)
            try:
                pid = self.launcher.start(launch)
            except AgentFailed as exc:
                if self.launcher.was_launched(entry.id):  # the marker says it already ran
                    final, reason = State.ACTED, str(exc)
                else:
                    final, reason = State.FAILED, str(exc)
                    log.error("agent.failed", agent=agent, reason=str(exc))
            else:
                final, reason = State.ACTED, None
                log.info("agent.started", agent=agent, pid=pid, decision=decision.action)
        record = self._record(entry, decision, agent, pid, approved_by)
        # fsync off the event loop: LLM slots and other files keep moving meanwhile.
        await asyncio.to_thread(write_json_atomic, self._record_path(entry), record)
        self.ledger.update(entry.id, final, reason=reason, pid=pid)

    def _launch_for(
        self, entry: Entry, loaded: Loaded, decision: Decision, agent: str, retry: bool
    ) -> Launch:
        path, sha256, meta = loaded.path, loaded.sha256, loaded.document.agent_metadata
        decisions = self.config.daemon.decisions_dir
        params_file = decisions / record_name(path, sha256, "params")
        write_json_atomic(params_file, decision.suggested_params, durable=False)
        run_id = entry.run_id or ""
        values = {
            "parent_run_id": (meta.parent_run_id or "") if retry else run_id,
            "step": str(meta.pipeline_step if retry else meta.pipeline_step + 1),
            "retry_count": str(meta.retries + 1 if retry else 0),
            "params_file": str(params_file),
            "result_file": str(path),
            "results_dir": str(self.config.daemon.results_dir),
            "decision": decision.action,
            "decision_file": str(decisions / record_name(path, sha256, "decision")),
        }
        return Launch(entry.id, agent, self.config.agents[agent], values)

    def _agent_exited(self, launch_id: int, pid: int, code: int | None, duration: float) -> None:
        entry = self.ledger.get(launch_id)
        log = get_logger(file=entry.path, run_id=entry.run_id, step=entry.step)
        self.ledger.update(entry.id, entry.state, exit_code=code, ended=time.time())
        event = log.info if code == 0 else log.error if code is not None else log.warning
        event("agent.exited", agent=entry.agent, pid=pid, exit_code=code,
              duration_s=round(duration, 3))  # fmt: skip
        self._on_change()

    def _record_path(self, entry: Entry) -> Path:
        return self.config.daemon.decisions_dir / record_name(
            Path(entry.path), entry.sha256, "decision"
        )

    def _record(
        self,
        entry: Entry,
        decision: Decision,
        agent: str | None,
        pid: int | None,
        approved_by: str,
    ) -> dict[str, Any]:
        """The decision record: everything from the ledger entry, nothing re-read from the file."""
        return {
            "record": "prng-llm-daemon/decision-v1",
            "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "result_file": str(self.config.daemon.results_dir / entry.path),
            "sha256": entry.sha256,
            "run_id": entry.run_id,
            "parent_run_id": entry.parent_run_id,
            "pipeline_run": entry.root_run_id,
            "pipeline_step": entry.step,
            "pipeline_step_name": step(entry.step).name if entry.step else None,
            "decision": decision.action,
            "policy_path": decision.path,
            "confidence": decision.confidence,
            "calibrated_confidence": decision.calibrated_confidence,
            "reasoning": decision.reasoning,
            "suggested_params": decision.suggested_params,
            "llm_metadata": decision.llm_metadata,
            "agent": agent,
            "pid": pid,
            "approved_by": approved_by or None,
        }

    # -- start-up and operator commands ---------------------------------------------------

    def reconcile(self) -> list[Entry]:
        """After a crash: settle launch intents by their markers; return entries to redo.

        Agents launched before the restart are watched again if they still run, and reported
        lost if they ended unseen (their results, if any, arrive as files like any other).
        """
        for entry in self.ledger.agents_unaccounted():
            log = get_logger(file=entry.path, run_id=entry.run_id, step=entry.step)
            assert entry.pid is not None and entry.agent is not None
            if self.launcher.is_running(entry.id, entry.pid):
                agent = self.config.agents.get(entry.agent)
                timeout = agent.timeout_seconds if agent else ADOPTED_TIMEOUT_SECONDS
                remaining = max(1.0, timeout - (time.time() - entry.updated))
                self.launcher.adopt(entry.id, entry.agent, entry.pid, remaining)
                log.info("agent.adopted", agent=entry.agent, pid=entry.pid)
            else:
                reason = "its agent ended while the daemon was not running; exit status unknown"
                self.ledger.update(entry.id, entry.state, ended=time.time(), reason=reason)
                log.warning("agent.lost", agent=entry.agent, pid=entry.pid, reason=reason)
        redo = []
        for entry in self.ledger.in_state(State.LAUNCHING):
            log = get_logger(file=entry.path, run_id=entry.run_id, step=entry.step)
            if self.launcher.was_launched(entry.id):
                record_path = self._record_path(entry)
                if entry.decision is not None and not record_path.exists():
                    decision = Decision.model_validate(entry.decision)
                    record = self._record(entry, decision, entry.agent, None, "")
                    write_json_atomic(record_path, record)
                self.ledger.update(entry.id, State.ACTED, reason="launched before a restart")
                log.info("agent.reconciled", agent=entry.agent, launched=True)
            else:
                log.info("agent.reconciled", agent=entry.agent, launched=False)
                redo.append(entry)
        return redo

    async def relaunch(self, entry: Entry) -> None:
        """Finish an entry whose launch intent was recorded but which never launched."""
        assert entry.decision is not None
        await self._resume(entry, Decision.model_validate(entry.decision), "")

    async def resolve(self, run_id: str, verb: str) -> tuple[bool, str]:
        """Apply `approve`, `approve-retry` or `reject` to the escalation of `run_id`.

        Returns (applied?, what happened in one line); a command that cannot be applied is
        refused with the reason and leaves the escalation as it was. Raises only on bugs.
        """
        entry = self.ledger.by_run_id(run_id)
        if entry is None or entry.state is not State.ESCALATED or entry.decision is None:
            state = entry.state.value if entry else "unknown"
            return False, f"{run_id}: no pending escalation (state: {state})"
        log = get_logger(file=entry.path, run_id=run_id, step=entry.step, command=verb)
        if verb == "reject":
            self.ledger.update(entry.id, State.DONE, reason="rejected by operator")
            log.info("escalation.rejected")
            self._on_change()
            return True, f"rejected: {run_id} stops here"
        action = "retry" if verb == "approve-retry" else "proceed"
        path = self.config.daemon.results_dir / entry.path
        try:
            loaded = load_result(path, max_bytes=self.config.daemon.max_result_bytes)
        except ResultRejected as exc:
            if not os.path.lexists(path):
                return False, "the result file was deleted since it was escalated"
            return False, f"the result file is no longer valid: {exc}"
        if loaded.sha256 != entry.sha256:
            return False, "the result file changed since it was escalated"
        row = step(loaded.document.agent_metadata.pipeline_step)
        agent = row.agent if action == "retry" else row.follow_up_agent
        if not (action == "proceed" and row.is_last) and agent not in self.config.agents:
            return False, f"agent {agent} is not in the config (any more)"
        decision = Decision.model_validate(entry.decision).model_copy(
            update={"action": action, "path": "operator"}
        )
        entry = self.ledger.update(
            entry.id, entry.state, decision=decision.model_dump(mode="json"), action=action
        )
        log.info("escalation.approved", decision=action)
        await self.act(entry, loaded, decision, log, "operator")
        self._on_change()
        after = self.ledger.get(entry.id)
        if after.state is State.DONE:
            return True, f"approved: {run_id} -> pipeline run complete"
        if after.state is State.FAILED:
            return True, f"approved: {run_id} -> {agent} could not start: {after.reason}"
        return True, f"approved: {run_id} -> started {agent}"

    async def _resume(self, entry: Entry, decision: Decision, approved_by: str) -> None:
        path = self.config.daemon.results_dir / entry.path
        loaded = load_result(path, max_bytes=self.config.daemon.max_result_bytes)
        log = get_logger(file=entry.path, run_id=entry.run_id, step=entry.step)
        if loaded.sha256 != entry.sha256:
            self.ledger.update(entry.id, State.FAILED, reason="file changed before it was acted on")
            log.error("agent.failed", reason="file changed before it was acted on")
            return
        await self.act(entry, loaded, decision, log, approved_by)


def derived_run_id(path: Path, step_number: int, sha256: str) -> str:
    """A stable run id for a result that carries none: its step, mtime and content hash."""
    stamp = datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%Y%m%d_%H%M%S")
    return f"step{step_number}_{stamp}_{sha256[:6]}"


def _recently_changed(path: Path) -> bool:
    try:
        return time.time() - path.lstat().st_mtime < SETTLE_SECONDS
    except OSError:
        return False


def _rejected_key(path: Path) -> str:
    """A rejected file is keyed by size and mtime: the same bad file is quarantined once, and a
    rewritten one is looked at again."""
    try:
        info = path.lstat()
    except OSError:
        return "rejected:missing"
    return f"rejected:{info.st_size}:{info.st_mtime_ns}"
