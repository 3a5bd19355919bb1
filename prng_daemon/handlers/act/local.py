"""Agents as the daemon's own children: configured argv only, no shell, one launch per result
file (the default outside systemd).

Each local launch is guarded by a marker file that the *child* creates with O_EXCL during
posix_spawn, before it execs the agent. After a crash, a marker on disk proves the launch
happened, and a second spawn of the same launch fails in the kernel instead of running twice.
Markers are named after the file version (name + content hash), not a ledger row: a rebuilt
ledger is still guarded by them, and cannot be blocked by them for a file they never launched.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from ...document.files import make_dir
from ...errors import PASSING_ERRNOS, AgentFailed
from ...log import get_logger
from ...servers.spawn import killpg
from .launcher import (
    AgentRun,
    AlreadyLaunched,
    Launch,
    OnExit,
    agent_env,
    daemon_environ,
    marker_file,
)

__all__ = ["LocalLauncher", "is_agent", "stop_local_agent"]

KILL_GRACE_SECONDS = 10.0
POLL_SECONDS = 1.0
"""How often an agent is looked at when it cannot be watched by a pidfd (no fd left)."""


class LocalLauncher:
    """Agents as the daemon's own children, each in its own session; output to a log file."""

    kind = "local"

    def __init__(
        self,
        markers_dir: Path,
        logs_dir: Path,
        on_exit: OnExit,
    ) -> None:
        self._markers = markers_dir
        self._logs = logs_dir
        self._on_exit = on_exit
        self._running: dict[int, asyncio.Task[None]] = {}
        self._agents: dict[int, tuple[AgentRun, int]] = {}
        # Taken once: decoding os.environ cost every launch 0.05 ms.
        self._environ = daemon_environ()
        markers_dir.mkdir(parents=True, exist_ok=True)
        logs_dir.mkdir(parents=True, exist_ok=True)

    def marker(self, key: str) -> Path:
        return marker_file(self._markers, key)

    def was_launched(self, key: str) -> bool:
        return self.marker(key).exists()

    @property
    def running(self) -> int:
        return len(self._running)

    async def start(self, launch: Launch) -> int:
        """Spawn the agent; return its pid. Raise AgentFailed if it cannot start."""
        name = launch.run.agent
        if launch.config.user is not None:
            raise AgentFailed(f"agent {name}: `user` needs the systemd launcher (daemon.launcher)")
        argv = launch.argv
        program = shutil.which(argv[0])
        if program is None:
            raise AgentFailed(f"agent {name}: program not found: {argv[0]}")
        if launch.config.cwd is not None:
            # posix_spawn has no chdir action in Python: env(1) changes directory, then execs.
            argv = ["env", f"--chdir={launch.config.cwd}", "--", *argv]
            program = shutil.which("env") or "/usr/bin/env"
        env = self._environ | agent_env(launch)
        log_file = self._logs / f"{launch.values.get('parent_run_id', 'run')}.{name}.log"
        marker = self.marker(launch.run.key)
        try:
            try:
                pid = self._spawn(program, argv, env, marker, log_file)
            except FileNotFoundError:
                # A clean-up may have removed the markers' or the logs' directory: made again
                # (never through a link), then one spawn more.
                made = [str(d) for d in (self._markers, self._logs) if make_dir(d)]
                if not made:
                    raise
                get_logger(agent=name).warning("agent.dir_made", directories=made)
                pid = self._spawn(program, argv, env, marker, log_file)
        except OSError as exc:
            if exc.errno in PASSING_ERRNOS:
                raise  # no fd, memory or space left now: the launch is tried again soon
            missing = _missing(program) if exc.errno == errno.ENOENT else None
            code = errno.errorcode.get(exc.errno or 0, "?")
            why = f"{missing} does not exist" if missing else f"{exc.strerror} ({code})"
            raise AgentFailed(f"agent {name}: cannot start {argv[0]}: {why}") from None
        # The agent first: its exec and dynamic loader run before the daemon's own follow-up
        # (the log line, the explanation request, the record), where the kernel put it on this
        # CPU. A no-op otherwise. Measured: the agent starts 0.3 ms sooner (RESULTS §1).
        os.sched_yield()
        if launch.config.properties:
            get_logger(agent=name, pid=pid).warning(
                "agent.properties_ignored", reason="unit properties need the systemd launcher"
            )
        timeout = launch.config.timeout_seconds
        self._track(launch.run, pid, self._watch(launch.run.launch_id, name, pid, timeout))
        return pid

    def _spawn(
        self, program: str, argv: list[str], env: dict[str, str], marker: Path, log_file: Path
    ) -> int:
        """posix_spawn the agent in a session of its own, its marker made by the child."""
        flags = os.O_WRONLY | os.O_CREAT
        try:
            return os.posix_spawn(
                program,
                argv,
                env,
                file_actions=[
                    # The launch's guard (O_EXCL): it fails here when it happened before.
                    (os.POSIX_SPAWN_OPEN, 3, str(marker), flags | os.O_EXCL, 0o644),
                    (os.POSIX_SPAWN_CLOSE, 3),
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, str(log_file), flags | os.O_APPEND, 0o640),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                ],
                setsid=True,
            )
        except FileExistsError:
            raise AlreadyLaunched(
                "the launch for this file version already happened; not starting it twice"
            ) from None
        except OSError:
            # glibc reports a failed exec (ENOENT from a bad #! line, ENOEXEC from a binary that
            # is not one) as posix_spawn's error, after the child's file actions ran: the
            # marker exists, but nothing was launched. Only this attempt can have made it
            # (O_EXCL), so it goes, and the file version stays launchable.
            marker.unlink(missing_ok=True)
            raise

    def adopt(self, run: AgentRun, pid: int, timeout: float) -> bool:
        """Watch an agent started before a restart: its end is seen, its exit code is not."""
        if not is_agent(run.launch_id, pid):
            return False
        watch = self._watch(run.launch_id, run.agent, pid, timeout, own_child=False)
        self._track(run, pid, watch)
        return True

    def find(self, run: AgentRun) -> int | None:
        """The agent of `run` by its environment: the session leader (each agent starts its
        own session) whose PRNG_LAUNCH_ID is this launch's."""
        with os.scandir("/proc") as entries:
            for entry in entries:
                pid = int(entry.name) if entry.name.isdigit() else 0
                if pid and _leads_session(pid) and is_agent(run.launch_id, pid):
                    return pid
        return None

    def outages(self) -> list[str]:
        return []

    def agents(self) -> list[dict[str, Any]]:
        return [
            {"run_id": run.run_id, "agent": run.agent, "pid": pid}
            for run, pid in self._agents.values()
        ]

    def _track(self, run: AgentRun, pid: int, watch: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(watch)
        self._running[run.launch_id] = task
        self._agents[run.launch_id] = (run, pid)

        def done(_: object) -> None:
            self._running.pop(run.launch_id, None)
            self._agents.pop(run.launch_id, None)

        task.add_done_callback(done)

    async def _watch(
        self, launch_id: int, agent: str, pid: int, timeout: float, own_child: bool = True
    ) -> None:
        log = get_logger(agent=agent, pid=pid, launch_id=launch_id)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        pidfd: int | None = None
        polling: asyncio.Task[None] | None = None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._on_exit(launch_id, pid, _reap(pid) if own_child else None, 0.0)
            return
        except OSError as exc:  # no fd left (EMFILE): the agent runs all the same, watched
            log.error("agent.watch_degraded", error=str(exc),
                      action=f"polling /proc every {POLL_SECONDS:g}s")  # fmt: skip
            polling = loop.create_task(_poll_end(pid, own_child, on_exit))
        else:
            loop.add_reader(pidfd, on_exit)
        try:
            try:
                await asyncio.wait_for(asyncio.shield(exited), timeout)
            except TimeoutError:
                log.error("agent.timeout", timeout_seconds=timeout)
                await self._terminate(pid, exited)
        except asyncio.CancelledError:
            log.info("agent.detached", reason="the daemon is stopping; the agent runs on")
            raise
        finally:
            if pidfd is not None:
                loop.remove_reader(pidfd)
                os.close(pidfd)
            if polling is not None:
                polling.cancel()
        code = _reap(pid) if own_child else None
        self._on_exit(launch_id, pid, code, time.monotonic() - started)

    async def _terminate(self, pid: int, exited: asyncio.Future[None]) -> None:
        killpg(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exited), KILL_GRACE_SECONDS)
        except TimeoutError:
            killpg(pid, signal.SIGKILL)
            await exited

    def describe(self, run: AgentRun, pid: int) -> str:
        return f"pid {pid}"

    async def stop(self) -> None:
        """Stop watching (agents keep running: they may be days of GPU work)."""
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)


def is_agent(launch_id: int, pid: int) -> bool:
    """Whether `pid` is still the agent of this launch (not a reused pid)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"PRNG_LAUNCH_ID={launch_id}".encode() in environ.split(b"\0")


def _missing(program: str) -> str | None:
    """What is missing when exec said ENOENT: the program, or the interpreter its #! names."""
    try:
        with open(program, "rb") as f:
            head = f.readline(256)
    except FileNotFoundError:
        return program
    except OSError:
        return None
    words = head[2:].split() if head.startswith(b"#!") else []
    if words and not os.path.exists(words[0]):
        return f"its #! interpreter {os.fsdecode(words[0])}"
    return None


def _leads_session(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold anything
    return fields[3] == str(pid)


def stop_local_agent(launch_id: int, pid: int) -> bool:
    """SIGTERM to the process group of this launch's agent; False if it no longer runs."""
    if not is_agent(launch_id, pid):
        return False
    killpg(pid, signal.SIGTERM)
    return True


async def _poll_end(pid: int, own_child: bool, ended: Callable[[], None]) -> None:
    """Call `ended` once process `pid` has ended, looking every POLL_SECONDS; no fd needed.

    A child is asked without being reaped (WNOWAIT: its exit code is read after); another
    process is gone when its pid is (init reaps it)."""
    while True:
        await asyncio.sleep(POLL_SECONDS)
        try:
            if own_child:
                done = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            else:
                os.kill(pid, 0)
                done = False
        except (ChildProcessError, ProcessLookupError):
            done = True
        if done:
            ended()
            return


def _reap(pid: int) -> int | None:
    """The exit code (negative: killed by that signal), or None if it is still running."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if done else None
