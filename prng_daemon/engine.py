"""One result file through the pipeline: validate → decide → act → record, exactly once.

The ledger is consulted before any work and written at every step, so a crash at any point
is reconciled at the next start: never a second launch, never a lost one. A row left mid-way
is resumed or settled by the sweep (`recovery`); operator commands are answered in `commands`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from structlog.typing import FilteringBoundLogger

from .config import Config
from .document.decision import Decision
from .document.metadata import AgentMetadata
from .document.names import utf8_name
from .document.pipeline import step
from .errors import AgentFailed, LaunchUnavailable, LLMUnavailable, ResultRejected, UnsafePath
from .handlers.act.launcher import (
    AgentLauncher,
    AlreadyLaunched,
    OnExit,
    launch_key,
)
from .handlers.act.plan import agent_for, derived_run_id, launch_for
from .handlers.record import write_record
from .handlers.validate import Deferred, Loaded, load_result
from .ledger import RESUMABLE, Entry, Ledger, State
from .log import get_logger
from .recovery import MAX_RESUMES, Recovery

__all__ = ["Engine", "Explaining", "Source"]


@dataclass(frozen=True)
class Explaining:
    """A decision to act on now, its explanation still being asked for: the decision record
    waits for it, the launch does not (the action never depends on it)."""

    decision: Decision
    explained: asyncio.Future[Decision]
    """The same decision with the model's confidence word and reasoning; never an LLM error."""


DecideFn = Callable[[AgentMetadata, Mapping[str, Any]], Awaitable[Decision | Explaining]]
"""Decides a result from its agent_metadata and what the file holds beside it (its `result`:
the rules check its numbers too)."""
Source = str
"""Why a path is looked at: "closed", "moved", "scan" or "retry"."""

LAUNCH_AGAIN_SECONDS = 2.0
"""The first wait before a launch whose agent never ran is made again (doubled each time)."""

NAME_NOT_UTF8 = "the file name is not valid UTF-8; rename the file"

INLINE_CHECK_BYTES = 64 << 10
"""A result up to this size is checked on the event loop, skipping the hop to a worker thread and
back (~0.1 ms, twice that after an idle gap): 25 us for a typical 1 KB result, 3.5 ms at most for
64 KiB built to be slow (21,000 empty objects), less than the 5 ms a worker thread may hold the GIL
before the loop gets a turn anyway. Bigger files, and any that needs jsonschema's walk for its
messages (a quarter of a second for 64 KiB of bad entries), are checked in the thread."""

SETTLE_SECONDS = 60.0
"""A file found by a scan that does not parse yet, and changed this recently, may still be
being written (NFS, a slow copy): it is left for later instead of quarantined."""


class Engine:
    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        decide: DecideFn,
        launcher_factory: Callable[[OnExit], AgentLauncher],
        on_change: Callable[[], None] = lambda: None,
        requeue: Callable[[Path, Source], None] = lambda path, source: None,
    ) -> None:
        """`requeue`: hands a file back to the pipeline (a launch to make again)."""
        self.config = config
        self._requeue = requeue
        self.ledger = ledger
        self._decide = decide
        self.launcher = launcher_factory(self._agent_exited)
        self._on_change = on_change
        self._run_locks: dict[str, asyncio.Lock] = {}
        self._busy: set[str] = set()
        self.recovery = Recovery(ledger, self.launcher, self._busy, on_change)
        self._checking = asyncio.Semaphore(1)
        self.current: str = "idle"
        """What the engine is doing now, for STATUS= and `status`."""

    def reconfigure(self, new: Config) -> None:
        """Work by `new` from the next file on (a reload): the one way the engine's config
        changes. The ledger, launcher, locks and busy names live on; only settings change."""
        self.config = new

    # -- the pipeline ---------------------------------------------------------------------

    async def process(self, path: Path, source: Source) -> bool:
        """Take one result file as far as it can go; every outcome is in the ledger.

        False when the same path is being processed already: the caller tries again later.
        """
        if path.name in self._busy:
            return False
        self.recovery.taken_up(path.name)
        with self.holding(path.name):
            await self._process(path, source)
        return True

    def in_flight(self, name: str) -> bool:
        """True while `name`'s rows are being worked on (`holding`)."""
        return name in self._busy

    @contextmanager
    def holding(self, name: str) -> Iterator[None]:
        """While held, `name`'s rows are being worked on: the sweep leaves them alone."""
        self._busy.add(name)
        try:
            yield
        finally:
            self._busy.discard(name)

    async def _process(self, path: Path, source: Source) -> None:
        settings = self.config.daemon
        rel = path.name
        log = get_logger(file=utf8_name(rel))
        if utf8_name(rel) != rel:  # the ledger stores text: such a name can only be quarantined
            self._reject(path, ResultRejected(NAME_NOT_UTF8), source, log)
            return
        try:
            loaded = await self.load(
                path,
                max_bytes=settings.max_result_bytes,
                root=settings.results_dir,
                allowed_agents=self.config.agents.keys(),
            )
        except ResultRejected as exc:
            if os.path.lexists(path):
                self._reject(path, exc, source, log)
            else:
                self._vanished(rel, log)
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
                await self.act(entry, loaded, entry.decision, log)
            else:
                await self._decide_and_act(entry, loaded, log)
        if not lock.locked():
            self._run_locks.pop(root, None)

    async def load(self, path: Path, **limits: Any) -> Loaded:
        """load_result, one file at a time: on the loop where that is cheap, else in a worker
        thread (15 MB is seconds of CPU).

        Checking is work under the GIL: parallel threads gain nothing, and each extra one is one
        more that can hold the GIL through a long C call (json.loads of a big array) while the
        event loop waits its turn.
        """
        async with self._checking:
            try:
                return load_result(path, cheap_bytes=INLINE_CHECK_BYTES, **limits)
            except Deferred:
                return await asyncio.to_thread(load_result, path, **limits)

    def _vanished(self, name: str, log: FilteringBoundLogger) -> None:
        """The file is gone before it could be read: nothing to quarantine. A row of it left
        waiting or mid-way can never go on; it is settled now (this worker holds the name, so
        none of them is in flight)."""
        rows = self.ledger.of_path(name, *RESUMABLE)
        if not rows:
            log.info("result.vanished")
        for entry in rows:
            self.recovery.settle_stuck(
                self.config.daemon, entry, f"the file was deleted while {entry.state}", log
            )

    def _reject(
        self, path: Path, exc: ResultRejected, source: Source, log: FilteringBoundLogger
    ) -> None:
        if exc.maybe_partial and source == "scan" and _recently_changed(path):
            log.debug("result.incomplete", reason=str(exc))
            return
        entry, new = self.ledger.claim(utf8_name(path.name), _rejected_key(path))
        if not new:
            return
        if entry.state is State.CHANGED:  # an earlier version was decided: flagged, not re-run
            log.warning("result.changed", reason=f"{entry.reason}; the new content: {exc}")
            self._on_change()
            return
        self.ledger.update(entry, State.QUARANTINED, reason=str(exc))
        log.error("result.rejected", reason=exc.reason, pointer=exc.pointer or "/", source=source)
        self._on_change()

    async def _decide_and_act(
        self, entry: Entry, loaded: Loaded, log: FilteringBoundLogger
    ) -> None:
        meta = loaded.document.agent_metadata
        row = step(meta.pipeline_step)
        self.current = f"step {row.number}/6 {row.name}: deciding"
        self._on_change()
        try:
            taken = await self._decide(meta, loaded.document.model_extra or {})
        except LLMUnavailable as exc:
            self.ledger.update(entry, State.WAITING, reason=str(exc))
            log.warning("decision.waiting", reason=str(exc))
            self.current = "idle"
            self._on_change()
            return
        decision, explained = (
            (taken.decision, taken.explained) if isinstance(taken, Explaining) else (taken, None)
        )
        try:
            log.info(
                "decision.made",
                decision=decision.action,
                decided_by=decision.decided_by,
                confidence=decision.confidence,
                calibrated_confidence=decision.calibrated_confidence,
            )
            entry = self.ledger.update(
                entry, State.DECIDED, decision=decision, action=decision.action
            )
            await self.act(entry, loaded, decision, log, explained=explained)
        finally:  # acting failed before it awaited the explanation: it must not hold a slot on
            if explained is not None:
                explained.cancel()
        self.current = "idle"
        self._on_change()

    async def act(
        self,
        entry: Entry,
        loaded: Loaded,
        decision: Decision,
        log: FilteringBoundLogger,
        approved_by: str = "",
        explained: Awaitable[Decision] | None = None,
    ) -> None:
        """Carry out a decision: launch, escalate or finish the pipeline run; record it.

        The decision record is written before the final ledger state, so a crash in between
        leaves a state that is resumed (or reconciled) and the record rewritten, never missing.
        `explained`: the decision worded by the model, awaited after the launch for the record
        (a crash before it leaves the record worded by the finding alone).
        """
        row = step(loaded.document.agent_metadata.pipeline_step)
        pid: int | None = None
        agent: str | None = None
        reason: str | None
        worded: dict[str, Any] = {}
        if decision.action == "escalate":
            if explained is not None:  # nothing to launch: the person reads it in the reason
                decision, explained = await explained, None
                worded = {"decision": decision}
            final, reason = State.ESCALATED, decision.reasoning[:500]
            log.warning("decision.escalated", reason=decision.reasoning[:200])
        elif decision.action == "proceed" and row.is_last:
            final, reason = State.DONE, "pipeline run complete"
            log.info("pipeline.completed", pipeline_run=entry.root_run_id)
        else:
            agent = agent_for(row, decision.action)
            entry, final, reason, pid = await self._launch(
                entry, loaded, decision, agent, decision.action == "retry", log
            )
        if explained is not None:
            decision = await explained
            worded = {"decision": decision}
        try:
            # fsync off the event loop: LLM slots and other files keep moving meanwhile.
            await asyncio.to_thread(
                write_record, self.config.daemon, entry, decision, final, reason,
                agent=agent, pid=pid, approved_by=approved_by,
            )  # fmt: skip
        except UnsafePath as exc:  # it will not clear by itself: the row settles now, saying so
            if reason != str(exc):
                log.error("record.refused", reason=str(exc))
                reason = f"{reason}; no decision record: {exc}" if reason else str(exc)
        self.ledger.update(entry, final, reason=reason, pid=pid, **worded)

    async def _launch(
        self,
        entry: Entry,
        loaded: Loaded,
        decision: Decision,
        agent: str,
        retry: bool,
        log: FilteringBoundLogger,
    ) -> tuple[Entry, State, str | None, int | None]:
        """Start `agent` for `entry` at most once: (entry, final state, reason, pid)."""
        key = launch_key(entry.path, entry.sha256)
        config = self.config.agents.get(agent)
        if config is None and not self.launcher.was_launched(key):
            # Validation only checks the follow-up agent, and a reload may remove one: a person
            # can add it and approve, or reject.
            reason = (
                f"{decision.action}: agent {agent} is not configured;"
                " add it to `agents` and approve, or reject"
            )
            log.warning("decision.escalated", reason=reason)
            return entry, State.ESCALATED, reason, None
        # The intent goes to the ledger first; the launcher's marker makes the spawn itself
        # idempotent, so the crash window between the two cannot cause a second launch.
        entry = self.ledger.update(entry, State.LAUNCHING, agent=agent)
        if config is None:  # launched before a restart, removed from the config since
            return entry, State.ACTED, "launched before a restart", None
        try:
            launch = launch_for(self.config.daemon, entry, loaded, decision, config, retry)
            pid = await self.launcher.start(launch)
        except UnsafePath as exc:  # its params file: nothing launched, and nothing will be
            log.error("agent.failed", agent=agent, reason=str(exc))
            return entry, State.FAILED, str(exc), None
        except AgentFailed as exc:
            # The marker (or its unit) says it already ran: its agent is watched since then.
            if isinstance(exc, AlreadyLaunched) or self.launcher.was_launched(key):
                return entry, State.ACTED, str(exc), self.recovery.pid_of(entry)
            log.error("agent.failed", agent=agent, reason=str(exc))
            if isinstance(exc, LaunchUnavailable):  # a person fixes the cluster, then approves
                return entry, State.ESCALATED, f"{exc}; approve once fixed, or reject", None
            return entry, State.FAILED, str(exc), None
        # The pid reaches the ledger before anything slow (the log, the explanation, the
        # record's fsync): a crash after the spawn leaves an agent the next start watches again.
        entry = self.ledger.update(entry, State.LAUNCHING, touch=False, pid=pid)
        where = self.launcher.describe(launch.run, pid)
        kind = "slurm" if config.launcher == "slurm" else self.launcher.kind
        log.info("agent.started", agent=agent, pid=pid, decision=decision.action,
                 launcher=kind, started_as=where)  # fmt: skip
        return entry, State.ACTED, None, pid

    def _agent_exited(
        self, launch_id: int, pid: int, code: int | None, duration: float,
        job_state: str | None = None, never_ran: str | None = None, /,
    ) -> None:  # fmt: skip
        entry = self.ledger.get(launch_id)
        log = get_logger(file=entry.path, run_id=entry.run_id, step=entry.step)
        if never_ran is not None:
            self._launch_again(launch_id, pid, f"Slurm job {pid} never started: {never_ran}")
            return
        fields: dict[str, Any] = {"exit_code": code, "ended": time.time()}
        if job_state is not None:
            fields["reason"] = f"Slurm job {pid}: {job_state}"
        try:
            self.ledger.update(entry, entry.state, touch=False, **fields)
        except OSError as exc:  # a full disk: said here; the next start reports the agent lost
            log.error("agent.exit_unrecorded", agent=entry.agent, pid=pid, error=str(exc))
        event = log.info if code == 0 else log.error if code is not None else log.warning
        if job_state is not None:  # a job that did not complete failed (NODE_FAIL exits 0)
            event = log.info if job_state == "COMPLETED" and code == 0 else log.error
        event("agent.exited", agent=entry.agent, pid=pid, exit_code=code,
              duration_s=round(duration, 3),
              **({"job_state": job_state} if job_state else {}))  # fmt: skip
        self._on_change()

    def _launch_again(self, launch_id: int, pid: int, reason: str) -> None:
        """The agent of `pid` never ran (the launcher undid the launch): launched again after a
        backoff, like a failed exec, until MAX_RESUMES attempts; then FAILED with the reason."""
        entry = self.ledger.get(launch_id)
        if entry.pid not in (pid, None):  # launched again already
            return
        log = get_logger(file=entry.path, run_id=entry.run_id, step=entry.step)
        loop = asyncio.get_running_loop()
        if entry.state is State.LAUNCHING:  # its record is still being written: once it is
            loop.call_later(1.0, self._launch_again, launch_id, pid, reason)
            return
        if entry.state is not State.ACTED:
            return
        if entry.attempts >= MAX_RESUMES:
            reason = f"{reason}; not launched again after {entry.attempts} attempts"
            self.ledger.update(entry, State.FAILED, reason=reason, pid=None)
            log.error("agent.never_started", agent=entry.agent, reason=reason)
        else:
            delay = min(LAUNCH_AGAIN_SECONDS * 2**entry.attempts, 60.0)
            self.ledger.update(entry, State.LAUNCHING, reason=reason, pid=None,
                               attempts=entry.attempts + 1)  # fmt: skip
            log.error("agent.never_started", agent=entry.agent, reason=reason,
                      action=f"launching it again in {delay:g}s")  # fmt: skip
            path = self.config.daemon.results_dir / entry.path
            loop.call_later(delay, self._requeue, path, "retry")
        self._on_change()


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
