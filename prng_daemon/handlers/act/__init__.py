"""Third stage: start the follow-up agent exactly once, on this host (`local`), as a systemd
transient unit (`systemd`) or as a Slurm job (`slurm`, per agent), behind one interface
(`launcher`); `plan` says what a decision starts (the agent, its placeholders).
`choose_launcher` decides which one `daemon.launcher` gets, checked for real; `make_launcher`
puts it together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ...config import DaemonSettings
from ...errors import ConfigError
from ...log import get_logger
from .launcher import AgentLauncher, OnExit
from .local import LocalLauncher
from .slurm import SlurmLauncher, WithSlurm
from .systemd import UNITS_FIX, SystemdLauncher, may_start_units, running_under_systemd

__all__ = ["LauncherChoice", "choose_launcher", "make_launcher"]


@dataclass(frozen=True)
class LauncherChoice:
    """Which launcher the daemon's agents get, and why: said in `launcher.selected` and
    `status`."""

    kind: Literal["local", "systemd"]
    reason: str


def choose_launcher(
    settings: DaemonSettings,
    under_systemd: Callable[[], str | None] = running_under_systemd,
) -> LauncherChoice:
    """The launcher `daemon.launcher` asks for, logged as `launcher.selected`. "auto" is systemd
    only when the daemon runs under systemd *and* a probe unit it starts really starts (on
    systemd 252/255 the shipped polkit rule alone cannot allow that); otherwise local, at
    warning level when systemd was there but refused. An explicit "systemd" that cannot work is
    a ConfigError naming the fix, before anything starts."""
    log = get_logger()
    if settings.launcher == "local":
        choice = LauncherChoice("local", "configured")
    elif (absent := under_systemd()) is not None:
        if settings.launcher == "systemd":
            raise ConfigError([f"config: daemon.launcher: systemd cannot be used: {absent}"])
        choice = LauncherChoice("local", absent)
    elif (refused := may_start_units()) is not None:
        if settings.launcher == "systemd":
            raise ConfigError(
                [
                    f"config: daemon.launcher: systemd cannot be used: {refused}; {UNITS_FIX},"
                    ' or set daemon.launcher to "local"'
                ]
            )
        choice = LauncherChoice("local", f"systemd may not be used: {refused}; {UNITS_FIX}")
        log.warning("launcher.selected", launcher=choice.kind, reason=choice.reason)
        return choice
    else:
        choice = LauncherChoice("systemd", "a probe unit started: the daemon may start units")
    log.info("launcher.selected", launcher=choice.kind, reason=choice.reason)
    return choice


def make_launcher(
    settings: DaemonSettings, choice: LauncherChoice, on_exit: OnExit
) -> AgentLauncher:
    """The chosen launcher, with Slurm beside it for the agents whose config says
    `launcher: "slurm"`."""
    launches = settings.state_dir / "launches"
    slurm = SlurmLauncher(launches, settings.state_dir / "slurm", on_exit)
    if choice.kind == "local":
        return WithSlurm(LocalLauncher(launches, settings.logs_dir / "agents", on_exit), slurm)
    return WithSlurm(SystemdLauncher(launches, on_exit), slurm)
