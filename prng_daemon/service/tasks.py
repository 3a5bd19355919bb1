"""The daemon's own long-lived asyncio tasks: restarted when they crash, and watched for progress.

Each task runs a coroutine that should never end by itself (a worker, the rescan loop, ...).
One that raises is logged with its traceback (`task.crashed`) and started again after a backoff;
past the restart budget `failed` is set and the daemon exits non-zero, so systemd restarts it.
Each task also heartbeats: `problems()` names every task that made no progress within its
deadline, and the watchdog pings only while there are none.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ..log import get_logger
from ..servers.backoff import RestartBudget

__all__ = ["Tasks"]

Factory = Callable[[], Coroutine[Any, Any, None]]

# A task that crashes 5 times within 5 minutes is not going to recover inside this process.
RESTART_ATTEMPTS = 5
RESTART_WINDOW_SECONDS = 300.0
BACKOFF_INITIAL_SECONDS = 0.2
BACKOFF_MAX_SECONDS = 30.0

log = get_logger()


@dataclass
class _Task:
    name: str
    deadline: float | None
    """Seconds without a heartbeat after which the task counts as stuck (None: never)."""
    budget: RestartBudget
    last_beat: float | None
    """None while the task waits for work, which may take as long as it likes."""
    crashes: int = 0
    problem: str = ""


class Tasks:
    """Runs named coroutines under supervision; time is injectable for the heartbeat checks."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        budget: Callable[[], RestartBudget] | None = None,
    ) -> None:
        """`budget` makes each task's restart policy (default: 5 restarts in 5 minutes)."""
        self._clock = clock
        self._budget = budget or (
            lambda: RestartBudget(
                RESTART_ATTEMPTS,
                RESTART_WINDOW_SECONDS,
                BACKOFF_INITIAL_SECONDS,
                BACKOFF_MAX_SECONDS,
                stable_after=RESTART_WINDOW_SECONDS,
            )
        )
        self._tasks: dict[str, _Task] = {}
        self._running: set[asyncio.Task[None]] = set()
        self.failed = asyncio.Event()
        """Set when a task spent its restart budget: the daemon must exit non-zero."""
        self.failure = ""

    def start(self, name: str, factory: Factory, deadline: float | None) -> asyncio.Task[None]:
        """Run `factory()` as task `name`, again after each crash, until cancelled or it returns.

        The task must call `beat(name)` at least every `deadline` seconds while it works, or
        `idle(name)` before it waits for work; `deadline` None: crashes are watched, not progress.
        """
        entry = _Task(name, deadline, self._budget(), last_beat=self._clock())
        self._tasks[name] = entry
        task = asyncio.get_running_loop().create_task(self._run(entry, factory), name=name)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    def beat(self, name: str) -> None:
        """Task `name` made progress now."""
        self._tasks[name].last_beat = self._clock()

    def idle(self, name: str) -> None:
        """Task `name` is waiting for work: healthy however long that takes."""
        self._tasks[name].last_beat = None

    def set_deadline(self, name: str, deadline: float) -> None:
        """A reload changed how long task `name` may take between heartbeats."""
        self._tasks[name].deadline = deadline

    def problems(self) -> list[str]:
        """One line per task that is stuck or dead; empty when all are healthy."""
        now = self._clock()
        found = []
        for t in self._tasks.values():
            if t.problem:
                found.append(f"{t.name} {t.problem}")
            elif t.last_beat is not None and t.deadline and now - t.last_beat > t.deadline:
                found.append(f"{t.name} stuck: no progress for {now - t.last_beat:.0f}s")
        return found

    async def stop(self) -> None:
        """Cancel every task and wait for them to end."""
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def _run(self, t: _Task, factory: Factory) -> None:
        try:
            await self._keep_running(t, factory)
        except asyncio.CancelledError:
            self._tasks.pop(t.name, None)  # stopped on purpose: nothing to watch any more
            raise

    async def _keep_running(self, t: _Task, factory: Factory) -> None:
        while True:
            started = self._clock()
            t.last_beat = started
            try:
                await factory()
            except Exception as exc:
                t.crashes += 1
                log.exception("task.crashed", task=t.name, error=repr(exc), crashes=t.crashes)
            else:
                self._tasks.pop(t.name, None)  # finished on purpose (a worker when draining)
                return
            delay = t.budget.next_delay(self._clock(), clean_since=started)
            if delay is None:
                t.problem = f"dead: crashed {t.crashes} times"
                self.failure = f"task {t.name} crashed {t.crashes} times; giving up"
                log.error("task.gave_up", task=t.name, crashes=t.crashes)
                self.failed.set()
                return
            # Waiting to restart is not being stuck: the budget, not the watchdog, bounds it.
            t.last_beat = None
            log.warning("task.restarting", task=t.name, delay_s=round(delay, 3))
            await asyncio.sleep(delay)
