"""Agents as transient systemd units: `systemd-run` starts them, `systemctl show` watches them.

Each launch is `prng-agent-<run_id>.service`, started by PID 1 outside the daemon's cgroup and
sandbox: it survives a daemon restart, runs as its configured user with its own properties, and
its output is in `journalctl -u`. Exactly once, as with the local launcher's marker: the unit's
own ExecStartPre= makes the launch marker with mkdir (atomic: a second unit of the same launch
fails there, before its agent runs), and while a unit is loaded its name cannot be started again.
Its ExecStopPost= writes $SERVICE_RESULT $EXIT_CODE $EXIT_STATUS beside the marker, so an agent
that ended while the daemon was down is reported with its real exit; the unit itself is
collected when it ends (--collect), nothing is left loaded.

Subprocesses rather than D-Bus: systemd-run parses every `properties` value (MemoryMax=8G,
DeviceAllow=...) exactly as unit files are parsed, with no new dependency; a launch is rare and
costs one fork, and polling costs one `systemctl show` for all running agents together, never
for finished ones (numbers in docs/launchers.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import AgentFailed, DaemonError
from ...log import get_logger
from .launcher import (
    AgentRun,
    AlreadyLaunched,
    Launch,
    OnExit,
    Polled,
    agent_env,
    clock,
    daemon_environ,
    exit_file,
    marker_file,
)

__all__ = [
    "UNITS_FIX",
    "SystemdLauncher",
    "may_start_units",
    "probe_argv",
    "read_exit",
    "running_under_systemd",
    "show_units",
    "stop_unit",
    "unit_name",
]

UNIT_PREFIX = "prng-agent-"
POLL_SECONDS = 5.0
"""How often the running agents' units are looked at (one `systemctl show` for all)."""
SYSTEMCTL_TIMEOUT_SECONDS = 30.0
"""systemd-run and systemctl wait this long for PID 1 at most (its own bus timeout is 25 s)."""
PROBE_TIMEOUT_SECONDS = 10.0
"""How long the start-up probe may take before systemd counts as not answering."""
UNITS_FIX = 'allow it with the polkit rules of systemd/README.md ("Agents as units")'
"""What to do when the daemon's user may not start units."""
_UNIT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")
# mkdir fails if the marker exists: the unit fails before its agent runs. Written by PID 1 with
# full privileges ("+"): the agent's user need not be able to write the daemon's state dir.
_MARK = "+/bin/mkdir ${PRNG_LAUNCH_MARKER}"
# "$$" is a literal "$" for systemd, which expands variables in command lines itself; the shell
# gets the variables. set -C: a unit refused by its marker never overwrites the first's exit.
_RECORD_EXIT = (
    '+/bin/sh -c \'set -C; echo "$$SERVICE_RESULT $$EXIT_CODE $$EXIT_STATUS" > "$$PRNG_EXIT_FILE"\''
)
_GONE = frozenset({"inactive", "failed"})
_SETUP_FAILED = range(200, 250)
"""systemd's exit codes for a unit whose process failed before exec (systemd.exec(5))."""
_SETUP_NAMES = {200: "CHDIR: no such cwd", 203: "EXEC: cannot execute the program",
                216: "GROUP: no such group", 217: "USER: no such user"}  # fmt: skip


def unit_name(run_id: str) -> str:
    """`prng-agent-<run_id>.service`. Run ids (step3_20261125_193000_abc123) are unit-name
    characters already; anything else is escaped as systemd-escape does."""
    escaped = "".join(
        c if c in _UNIT_CHARS and not (i == 0 and c == ".") else f"\\x{ord(c):02x}"
        for i, c in enumerate(run_id)
    )
    return f"{UNIT_PREFIX}{escaped or 'run'}.service"


def _literal(arg: str) -> str:
    """An argument systemd passes on unchanged: it expands $VAR and ${VAR} in command lines."""
    return arg.replace("$", "$$")


def running_under_systemd(env: dict[str, str] | None = None) -> str | None:
    """Why the systemd launcher cannot be used here, or None when it can: the daemon is the
    process systemd started for a service, on a systemd host, with systemd-run and systemctl.

    $SYSTEMD_EXEC_PID (systemd >= 248) must be our pid: a test run or a demo started from inside
    some other service (a CI runner) inherits its $INVOCATION_ID, and must stay local."""
    env = dict(os.environ) if env is None else env
    if "INVOCATION_ID" not in env:
        return "not started by systemd (no INVOCATION_ID)"
    if env.get("SYSTEMD_EXEC_PID") != str(os.getpid()):
        return "not the process systemd started (SYSTEMD_EXEC_PID is not our pid)"
    if not Path("/run/systemd/system").is_dir():
        return "systemd is not the init system"
    for tool in ("systemd-run", "systemctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def probe_argv(unit: str, user: str | int, timeout: float = PROBE_TIMEOUT_SECONDS) -> list[str]:
    """The probe unit `may_start_units` starts: /bin/true as `user`, waited for and collected."""
    return [
        "systemd-run", "--quiet", "--no-ask-password", "--wait", "--collect",
        "--service-type=exec", f"--unit={unit}", f"--uid={user}",
        "--description=prng-llm-daemon: may it start agent units?",
        f"--property=RuntimeMaxSec={timeout:g}s", "--", "/bin/true",
    ]  # fmt: skip


def may_start_units(timeout: float = PROBE_TIMEOUT_SECONDS) -> str | None:
    """Why this process may not start agent units, or None when it may: found by starting one,
    `prng-agent-probe-<random>.service` running /bin/true as this process's user, the way
    agents are started (systemd-run, no password prompt) and collected when it ends. Only this
    is sure: polkit rules are code, and what systemd tells them differs between versions (252
    and 255 do not name a transient unit). A bus that does not answer in `timeout` is a no."""
    unit = f"{UNIT_PREFIX}probe-{secrets.token_hex(6)}.service"
    argv = probe_argv(unit, os.getuid(), timeout)
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            check=False, env=daemon_environ(),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"systemd-run {unit}: no answer from systemd within {timeout:g} s"
    except OSError as exc:
        return f"systemd-run: {exc.strerror or exc}"
    if done.returncode != 0:
        error = done.stderr.strip().splitlines()
        last = error[-1].rstrip(".") if error else f"exit status {done.returncode}"
        return f"systemd-run {unit}: {last}"
    return None


def read_exit(path: Path) -> tuple[str | None, int | None]:
    """(systemd's result, exit code — negative: killed by that signal) from an exit file."""
    try:
        result, code, status = path.read_text().split()
    except (OSError, ValueError):
        return None, None
    if code == "exited":
        return result, int(status) if status.isdigit() else None
    try:  # killed or dumped: EXIT_STATUS is the signal's name (TERM, KILL, ...)
        return result, -signal.Signals[f"SIG{status}"].value
    except KeyError:
        return result, None


def show_units(units: list[str], props: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """`systemctl show` of `units`: unit -> property -> value (LoadState=not-found if gone)."""
    done = subprocess.run(
        ["systemctl", "show", f"--property=Id,{','.join(props)}", "--", *units],
        capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_SECONDS, check=False,
        env=daemon_environ(),
    )  # fmt: skip
    if done.returncode != 0:
        raise OSError(f"systemctl show: {done.stderr.strip() or done.returncode}")
    return _parse_show(done.stdout)


def _parse_show(text: str) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for block in text.split("\n\n"):
        fields = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
        if "Id" in fields:
            found[fields["Id"]] = fields
    return found


def stop_unit(run_id: str) -> str | None:
    """`systemctl stop` the agent unit of `run_id`: its name, None if no such unit is loaded.
    DaemonError if systemd refuses (the caller may not manage units)."""
    if not Path("/run/systemd/system").is_dir():
        return None
    unit = unit_name(run_id)
    if show_units([unit], ("LoadState",)).get(unit, {}).get("LoadState") != "loaded":
        return None
    done = subprocess.run(
        ["systemctl", "stop", "--", unit], capture_output=True, text=True, env=daemon_environ()
    )
    if done.returncode != 0:
        raise DaemonError(f"systemctl stop {unit}: {done.stderr.strip()}")
    return unit


@dataclass
class _Watched:
    run: AgentRun
    pid: int
    started: float


class SystemdLauncher:
    """Agents as transient units; their ends seen by polling `systemctl show`."""

    kind = "systemd"

    def __init__(
        self, launches_dir: Path, on_exit: OnExit, poll_seconds: float = POLL_SECONDS
    ) -> None:
        self._dir = launches_dir
        self._on_exit = on_exit
        self._watched: Polled[str, _Watched] = Polled(poll_seconds, self._look, "units")
        launches_dir.mkdir(parents=True, exist_ok=True)

    def marker(self, key: str) -> Path:
        return marker_file(self._dir, key)

    def exit_file(self, key: str) -> Path:
        return exit_file(self._dir, key)

    def was_launched(self, key: str) -> bool:
        return self.marker(key).exists()

    @property
    def running(self) -> int:
        return len(self._watched.items)

    async def start(self, launch: Launch) -> int:
        run, config = launch.run, launch.config
        unit = unit_name(run.run_id)
        if self.was_launched(run.key):
            raise AlreadyLaunched(
                "the launch for this file version already happened; not starting it twice"
            )
        argv = launch.argv
        program = shutil.which(argv[0])
        if program is None:
            raise AgentFailed(f"agent {run.agent}: program not found: {argv[0]}")
        command = [
            "systemd-run", "--quiet", "--no-ask-password", "--collect", "--service-type=exec",
            f"--unit={unit}", f"--description={_description(run)}",
            f"--property=RuntimeMaxSec={config.timeout_seconds:g}s",
            f"--property=ExecStartPre={_MARK}", f"--property=ExecStopPost={_RECORD_EXIT}",
            f"--setenv=PRNG_LAUNCH_MARKER={self.marker(run.key)}",
            f"--setenv=PRNG_EXIT_FILE={self.exit_file(run.key)}",
            *(f"--setenv={k}={v}" for k, v in agent_env(launch).items()),
            *(f"--property={p}" for p in config.properties),
        ]  # fmt: skip
        if config.user is not None:
            try:  # here rather than as a unit that fails with status 217/USER and no message
                pwd.getpwnam(config.user)
            except KeyError:
                raise AgentFailed(f"agent {run.agent}: no such user: {config.user}") from None
            command.append(f"--uid={config.user}")
        if config.group is not None:
            command.append(f"--gid={config.group}")
        if config.cwd is not None:
            command.append(f"--working-directory={config.cwd}")
        command += ["--", program, *(_literal(a) for a in argv[1:])]
        done = await _run(command)
        if done.returncode != 0:
            await self._refused(run, unit, done.stderr.decode(errors="replace").strip())
        try:
            shown = await asyncio.to_thread(show_units, [unit], ("MainPID",))
        except (OSError, subprocess.TimeoutExpired):  # it runs all the same: watched, pid unknown
            shown = {}
        pid = int(shown.get(unit, {}).get("MainPID") or 0)
        self._watched.add(unit, _Watched(run, pid, time.monotonic()))
        return pid

    async def _refused(self, run: AgentRun, unit: str, error: str) -> None:
        """systemd-run failed: raise AlreadyLaunched if the unit is this launch's, else
        AgentFailed; a launch whose agent never ran stays launchable (like a failed exec)."""
        last = error.splitlines()[-1] if error else "failed"
        try:
            shown = await asyncio.to_thread(show_units, [unit], ("Description", "ActiveState"))
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AgentFailed(f"agent {run.agent}: systemd-run {unit}: {last}; {exc}") from None
        state = shown.get(unit, {})
        if "already" in error:  # "Unit ... was already loaded or has a fragment file."
            if state.get("Description") == _description(run):
                raise AlreadyLaunched(f"already launched as {unit}")
            raise AgentFailed(f"{unit} is running for another launch of run {run.run_id}")
        _, code = read_exit(self.exit_file(run.key))
        if state.get("ActiveState", "inactive") in _GONE and code in _SETUP_FAILED:
            # The agent never ran: systemd could not exec it (203), change to its user (217) or
            # directory (200)... The launch stays launchable, as after a failed local exec.
            with contextlib.suppress(FileNotFoundError):
                self.marker(run.key).rmdir()
                self.exit_file(run.key).unlink()
        hint = ""
        if "denied" in error or "authentication" in error.lower():
            hint = f"; the daemon's user may not start units: {UNITS_FIX}"
        if not error and code is not None:  # --quiet: a failed start job says nothing itself
            last = f"exit status {code} ({_SETUP_NAMES.get(code, 'see systemd.exec(5)')})"
        raise AgentFailed(
            f"agent {run.agent}: systemd-run {unit}: {last}; journalctl -u {unit}{hint}"
        )

    def adopt(self, run: AgentRun, pid: int, timeout: float) -> bool:
        """Watch a unit started before a restart; one that ended meanwhile is reported with
        its recorded exit at the first poll. The unit enforces its timeout itself."""
        unit = unit_name(run.run_id)
        try:
            loaded = show_units([unit], ("LoadState",)).get(unit, {}).get("LoadState")
        except (OSError, subprocess.TimeoutExpired) as exc:
            get_logger(agent_unit=unit).error("agent.unit_unknown", error=str(exc))
            loaded = None
        if loaded != "loaded" and not self.exit_file(run.key).exists():
            return False
        self._watched.add(unit, _Watched(run, pid, time.monotonic()))
        return True

    def find(self, run: AgentRun) -> int | None:
        """The unit's MainPID (0 once it ended with its exit recorded, for `adopt` to
        report); None when systemd no longer knows it and no exit was recorded."""
        unit = unit_name(run.run_id)
        try:
            shown = show_units([unit], ("LoadState", "MainPID")).get(unit, {})
        except (OSError, subprocess.TimeoutExpired):  # watched by name all the same
            shown = {"LoadState": "loaded"}
        if shown.get("LoadState") != "loaded" and not self.exit_file(run.key).exists():
            return None
        return int(shown.get("MainPID") or 0)

    def describe(self, run: AgentRun, pid: int) -> str:
        return unit_name(run.run_id)

    def outages(self) -> list[str]:
        failing = self._watched.failing
        if failing is None:
            return []
        return [f"systemd not answering since {clock(failing[0])}: {failing[1]}"]

    def agents(self) -> list[dict[str, Any]]:
        return [
            {"run_id": w.run.run_id, "agent": w.run.agent, "pid": w.pid, "unit": unit}
            for unit, w in self._watched.items.items()
        ]

    async def _look(self, units: list[str]) -> None:
        """One `systemctl show` for every watched unit; those gone or ended are reported."""
        states = await asyncio.to_thread(show_units, units, ("LoadState", "ActiveState"))
        for unit in units:
            state = states.get(unit, {})
            if state.get("LoadState") != "loaded" or state.get("ActiveState") in _GONE:
                self._ended(unit)

    def _ended(self, unit: str) -> None:
        watched = self._watched.items.pop(unit)
        run = watched.run
        result, code = read_exit(self.exit_file(run.key))
        if result == "timeout":
            get_logger(agent=run.agent, agent_unit=unit, launch_id=run.launch_id).error(
                "agent.timeout", reason="RuntimeMaxSec= reached: systemd stopped the unit"
            )
        self._on_exit(run.launch_id, watched.pid, code, time.monotonic() - watched.started)

    async def stop(self) -> None:
        await self._watched.stop("the daemon is stopping; the units run on")


def _description(run: AgentRun) -> str:
    """The unit's Description=: names its launch, so a restarted daemon knows its own unit."""
    return f"prng-llm-daemon agent {run.agent} for {run.run_id} (launch {run.key})"


async def _run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=daemon_environ(),
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SYSTEMCTL_TIMEOUT_SECONDS)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return subprocess.CompletedProcess(argv, -9, b"", b"timed out waiting for systemd")
    return subprocess.CompletedProcess(argv, proc.returncode or 0, out, err)
