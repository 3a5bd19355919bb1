"""Third stage: start the follow-up agent exactly once, on this host (`local`), as a systemd
transient unit (`systemd`) or as a Slurm job (`slurm`, per agent), behind one interface
(`launcher`). `make_launcher` puts together the one the config asks for."""

from __future__ import annotations

from ...config import DaemonSettings
from ...errors import ConfigError
from ...log import get_logger
from .launcher import AgentLauncher, OnExit
from .local import LocalLauncher
from .slurm import SlurmLauncher, WithSlurm
from .systemd import SystemdLauncher, running_under_systemd

__all__ = ["make_launcher"]


def make_launcher(settings: DaemonSettings, on_exit: OnExit) -> AgentLauncher:
    """The launcher `daemon.launcher` asks for ("auto": systemd when it can be used), with
    Slurm beside it for the agents whose config says `launcher: "slurm"`."""
    launches = settings.state_dir / "launches"
    why_not = running_under_systemd()
    log = get_logger()
    if settings.launcher == "systemd" and why_not is not None:
        raise ConfigError([f"config: daemon.launcher: systemd cannot be used: {why_not}"])
    slurm = SlurmLauncher(launches, settings.state_dir / "slurm", on_exit)
    if settings.launcher == "local" or why_not is not None:
        reason = "configured" if settings.launcher == "local" else why_not
        log.info("launcher.selected", launcher="local", reason=reason)
        return WithSlurm(LocalLauncher(launches, settings.logs_dir / "agents", on_exit), slurm)
    log.info("launcher.selected", launcher="systemd", setting=settings.launcher)
    return WithSlurm(SystemdLauncher(launches, on_exit), slurm)
