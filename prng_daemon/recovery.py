"""Recovery: what a restart or a crash left behind is reconciled, restored from the decision
records, or swept (resumed or settled), so that no launch is made twice and none is lost."""

from __future__ import annotations

import time
from collections.abc import Callable, Container
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from .config import Config, DaemonSettings
from .errors import UnsafePath
from .handlers.act.launcher import AgentLauncher, launch_key
from .handlers.act.plan import agent_run
from .handlers.record import read_records, record_path, write_record
from .ledger import Entry, Ledger, State
from .log import get_logger

__all__ = ["ADOPTED_TIMEOUT_SECONDS", "MAX_RESUMES", "Recovery"]

MAX_RESUMES = 3
"""How often a row found stuck in a transient state is resumed before it is settled FAILED."""

ADOPTED_TIMEOUT_SECONDS = 24 * 3600.0
"""Timeout for an adopted agent whose name is no longer in the config."""


class Recovery:
    """The rows a restart or a crash left mid-way, and the agents launched before a restart.

    `busy`: the names being worked on now (the engine's), which the sweep leaves alone.
    """

    def __init__(
        self,
        ledger: Ledger,
        launcher: AgentLauncher,
        busy: Container[str],
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.ledger = ledger
        self.launcher = launcher
        self._busy = busy
        self._on_change = on_change
        self._resumed: set[str] = set()
        """Names the sweep handed out to be processed again: not stuck while they wait."""

    def taken_up(self, name: str) -> None:
        """`name` is being processed again: the next sweep may find it stuck again."""
        self._resumed.discard(name)

    def reconcile(self, config: Config) -> None:
        """At start: rebuild a new ledger from the decision records, settle the launch intents
        their markers prove, and watch again every agent launched before the restart.

        An intent whose pid never reached the ledger (the daemon died right after the spawn)
        gets it from the launcher, which finds its agent (`find`): no agent runs unwatched.
        Agents still running are watched again (or, units, their recorded exit reported), and
        those that ended unseen are reported lost (their results, if any, arrive as files like
        any other). Launch intents with no marker are resumed by `sweep(at_start=True)`, like
        every other row left mid-way.
        """
        if self.ledger.is_empty():
            self.restore(config.daemon)
        for entry in self.ledger.in_state(State.LAUNCHING):
            log = get_logger(file=entry.path, run_id=entry.run_id, step=entry.step)
            launched = self.launcher.was_launched(launch_key(entry.path, entry.sha256))
            log.info("agent.reconciled", agent=entry.agent, launched=launched)
            if launched:
                settled = self._settle_launched(
                    config.daemon, entry, "launched before a restart", log
                )
                if settled.pid is None:
                    self._lost(settled, log)
        for entry in self.ledger.agents_unaccounted():
            log = get_logger(file=entry.path, run_id=entry.run_id, step=entry.step)
            assert entry.pid is not None and entry.agent is not None
            agent = config.agents.get(entry.agent)
            timeout = agent.timeout_seconds if agent else ADOPTED_TIMEOUT_SECONDS
            remaining = max(1.0, timeout - (time.time() - entry.updated))
            if self.launcher.adopt(agent_run(entry), entry.pid, remaining):
                log.info("agent.adopted", agent=entry.agent, pid=entry.pid)
            else:
                self._lost(entry, log)

    def _lost(self, entry: Entry, log: FilteringBoundLogger) -> None:
        """An agent launched before the restart ended while the daemon was not running."""
        reason = "its agent ended while the daemon was not running; exit status unknown"
        self.ledger.update(entry, entry.state, touch=False, ended=time.time(), reason=reason)
        log.warning("agent.lost", agent=entry.agent, pid=entry.pid, reason=reason)

    def pid_of(self, entry: Entry) -> int | None:
        """The pid of `entry`'s launched agent: the ledger's, else the launcher finds it."""
        return entry.pid if entry.pid is not None else self.launcher.find(agent_run(entry))

    def _settle_launched(
        self, settings: DaemonSettings, entry: Entry, reason: str, log: FilteringBoundLogger
    ) -> Entry:
        """A launch intent whose marker exists: ACTED, with its pid and decision record."""
        pid = self.pid_of(entry)
        path = record_path(settings, entry)
        if entry.decision is not None and not path.exists():
            try:
                write_record(
                    settings, entry, entry.decision, State.ACTED, reason,
                    agent=entry.agent, pid=pid,
                )  # fmt: skip
            except (OSError, UnsafePath) as exc:  # a full disk: the launch happened all the same
                log.error("record.failed", record=path.name, reason=str(exc))
        return self.ledger.update(entry, State.ACTED, reason=reason, pid=pid)

    def restore(self, settings: DaemonSettings) -> int:
        """Give a new ledger the history in the decision records; the number of rows restored.

        A file version with a record was settled under the old ledger (acted on, escalated,
        finished, failed): it is restored as such, never decided or launched again. Files with
        no record were never acted on and are decided as they are found.
        """
        decisions = settings.decisions_dir
        restored = self.ledger.restore(read_records(decisions))
        if restored:
            get_logger().info("ledger.restored", rows=restored, from_dir=str(decisions))
        return restored

    def sweep(
        self, settings: DaemonSettings, now: float | None = None, *, at_start: bool = False
    ) -> list[Path]:
        """Rows stuck in a transient state: resume them, or settle them; the files to process.

        Stuck means untouched for `daemon.transient_deadline_seconds` and not being worked on
        now, or, `at_start`, any (nothing is in flight before the workers start). A stuck row
        whose file is gone, or that was resumed MAX_RESUMES times already, is settled (`result.
        stuck`): FAILED, or ACTED if its launch marker exists. The others get an attempt more.
        """
        now = time.time() if now is None else now
        older_than = now if at_start else now - settings.transient_deadline_seconds
        again: list[Path] = []
        for entry in self.ledger.stuck(older_than):
            path = settings.results_dir / entry.path
            if entry.path in self._busy or entry.path in self._resumed or path in again:
                continue
            log = get_logger(file=entry.path, run_id=entry.run_id, step=entry.step)
            if not path.exists():
                reason = f"the file was deleted while {entry.state}"
            elif entry.attempts >= MAX_RESUMES:
                reason = f"still {entry.state} after {entry.attempts} resumes"
            else:
                # At start a resume is not a failure of the row (the daemon stopped): not counted.
                attempts = entry.attempts + (0 if at_start else 1)
                self.ledger.update(entry, entry.state, attempts=attempts)
                log.info("result.resumed", state=entry.state.value, attempts=attempts,
                         idle_s=round(now - entry.updated, 1))  # fmt: skip
                again.append(path)
                continue
            self.settle_stuck(settings, entry, reason, log)
        # Taken only now: a sweep cut short (a full disk) hands out none, and the next one finds
        # them all again.
        self._resumed.update(p.name for p in again)
        return again

    def settle_stuck(
        self, settings: DaemonSettings, entry: Entry, reason: str, log: FilteringBoundLogger
    ) -> None:
        """A row that cannot go on: FAILED with `reason`, or ACTED if its launch marker exists."""
        key = launch_key(entry.path, entry.sha256)
        if entry.state is State.LAUNCHING and self.launcher.was_launched(key):
            self._settle_launched(settings, entry, f"launched; {reason}", log)
        else:
            self.ledger.update(entry, State.FAILED, reason=reason)
        log.error("result.stuck", state=entry.state.value, reason=reason)
        self._on_change()
