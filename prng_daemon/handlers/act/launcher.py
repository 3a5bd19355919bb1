"""What the engine needs of a launcher (`AgentLauncher`), and what every launcher shares: the
launch (`Launch`, `AgentRun`), the agent's environment, and the launch key that makes a launch
happen at most once for one version of one result file."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from ...config import AgentConfig
from ...errors import AgentFailed
from ...log import get_logger

__all__ = [
    "AgentLauncher",
    "AgentRun",
    "AlreadyLaunched",
    "Launch",
    "OnExit",
    "Polled",
    "agent_env",
    "clock",
    "daemon_environ",
    "exit_file",
    "launch_key",
    "marker_file",
]


class OnExit(Protocol):
    """How a launcher reports an agent's end."""

    def __call__(
        self, launch_id: int, pid: int, code: int | None, duration: float,
        job_state: str | None = None, never_ran: str | None = None, /,
    ) -> None:  # fmt: skip
        """(launch id, pid — a Slurm agent's job id —, exit code — None when not known, e.g.
        not the daemon's child to reap —, seconds watched, a Slurm job's final state, why the
        agent never ran — its launch undone, to be made again —)."""


_SYSTEMD_ONLY = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID", "SYSTEMD_EXEC_PID"}
)


def daemon_environ() -> dict[str, str]:
    """The daemon's environment less its own systemd handles, which are not an agent's (or
    the tools' that start agents) to use."""
    return {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ONLY}


class AlreadyLaunched(AgentFailed):
    """This launch happened before (its marker, or its unit, exists): it is not made twice."""


@dataclass(frozen=True)
class AgentRun:
    """One launch as the ledger knows it: enough to find its agent again after a restart."""

    launch_id: int
    key: str
    """The marker's name: `launch_key` of the result file that asked for this launch."""
    run_id: str
    """The run id of that result file (a systemd unit is named after it)."""
    agent: str


@dataclass(frozen=True)
class Launch:
    """What to start: the agent's config, filled-in placeholders and daemon-made environment."""

    run: AgentRun
    config: AgentConfig
    values: Mapping[str, str]
    """Placeholder values; also exported as PRNG_<NAME> in the agent's environment."""

    @property
    def argv(self) -> list[str]:
        return [item.format_map(self.values) for item in self.config.argv]


class AgentLauncher(Protocol):
    """What the engine needs of a launcher; `on_exit` (given at construction) reports ends."""

    kind: str
    """"local", "systemd" or "slurm": said in `launcher.selected` and `status`."""

    @property
    def running(self) -> int:
        """How many agents are being watched."""
        ...

    def was_launched(self, key: str) -> bool:
        """Whether the launch with this key ever happened (its durable marker exists)."""
        ...

    async def start(self, launch: Launch) -> int:
        """Start the agent; its pid. AlreadyLaunched if it was before, AgentFailed if it
        cannot start."""
        ...

    def adopt(self, run: AgentRun, pid: int, timeout: float) -> bool:
        """After a restart: watch the agent again if it still runs, or report its end if it is
        known; False when neither (it ended unseen and its exit is lost)."""
        ...

    def find(self, run: AgentRun) -> int | None:
        """The pid (a job id, a unit's MainPID or 0) of a launch that happened but whose pid
        never reached the ledger (the daemon died right after the start); None when its agent
        is gone and nothing is left to watch."""
        ...

    def outages(self) -> list[str]:
        """What cannot be reached now, one line each (`Slurm controller unreachable since
        …`): while it lasts, the agents' states are those last seen."""
        ...

    def describe(self, run: AgentRun, pid: int) -> str:
        """Where the started agent runs, as the log and `status` say it: `pid 4242`,
        `prng-agent-<run_id>.service`."""
        ...

    def agents(self) -> list[dict[str, Any]]:
        """The running agents, for `status`: run_id, agent, pid and, for units, unit; for
        Slurm jobs job_id, node and state."""
        ...

    async def stop(self) -> None:
        """Stop watching; agents keep running (they may be days of GPU work)."""
        ...


def agent_env(launch: Launch) -> dict[str, str]:
    """What the daemon adds to an agent's environment: the config's env, the placeholders as
    PRNG_<NAME>, and PRNG_LAUNCH_ID (how a still-running agent is recognised)."""
    env = dict(launch.config.env)
    env.update({f"PRNG_{k.upper()}": v for k, v in launch.values.items()})
    env["PRNG_LAUNCH_ID"] = str(launch.run.launch_id)
    return env


def clock(ts: float) -> str:
    """A time.time() as the operator reads it in `status`: local time of day."""
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def marker_file(directory: Path, key: str) -> Path:
    """The durable proof that launch `key` happened, made by the launch itself (atomically):
    its existence is what `was_launched` answers."""
    return directory / f"{key}.launched"


def exit_file(directory: Path, key: str) -> Path:
    """Where the agent's end is written beside its marker, when the launcher cannot reap it."""
    return directory / f"{key}.exit"


def launch_key(path: str, sha256: str) -> str:
    """One key per version of one result file: at most one launch is ever made for it."""
    return hashlib.sha256(os.fsencode(path) + b"\0" + sha256.encode()).hexdigest()[:32]


K = TypeVar("K")
V = TypeVar("V")


class Polled(Generic[K, V]):
    """The agents a launcher watches from outside (units, jobs), and the one task that polls
    them all: every `seconds`, `look` at every one at once (it removes those that ended). A look
    that fails is said once, then tried again; the task ends when nothing is left to watch, so
    no poll runs while no agent does, and the cost never grows with finished agents."""

    def __init__(self, seconds: float, look: Callable[[list[K]], Awaitable[None]], what: str):
        self.items: dict[K, V] = {}
        self._seconds = seconds
        self._look = look
        self._what = what
        """What the items are, for the log: "units", "jobs"."""
        self._task: asyncio.Task[None] | None = None
        self.failing: tuple[float, Exception] | None = None
        """Since when (a time.time()) and why every look fails; None while they succeed."""

    def add(self, key: K, item: V) -> None:
        self.items[key] = item
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while self.items:
            await asyncio.sleep(self._seconds)
            keys = list(self.items)
            try:
                await self._look(keys)
            except Exception as exc:  # said once; the next poll tries again
                if self.failing is None:
                    get_logger().error(
                        "agent.poll_failed", error=repr(exc), **{self._what: len(keys)}
                    )
                self.failing = (self.failing[0] if self.failing else time.time(), exc)
                continue
            if self.failing is not None:
                get_logger().info("agent.poll_recovered", **{self._what: len(keys)})
            self.failing = None
        self.failing = None  # nothing left to watch: nothing is known to be down

    async def stop(self, reason: str) -> None:
        """Stop polling; the agents run on (`reason` says so in the log)."""
        if self.items:
            get_logger().info(
                "agent.detached", reason=reason, **{self._what: sorted(map(str, self.items))}
            )
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
