"""The launcher choice, agent unit settings refused at config load, exit files, and stop-agent
of a local agent. Units under a real systemd: tests/test_nspawn_units.py."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from prng_daemon.cli import main
from prng_daemon.config import AgentConfig, DaemonSettings
from prng_daemon.errors import AgentFailed, ConfigError
from prng_daemon.handlers.act import LauncherChoice, choose_launcher, make_launcher
from prng_daemon.handlers.act.launcher import AgentRun, Launch
from prng_daemon.handlers.act.local import LocalLauncher
from prng_daemon.handlers.act.systemd import (
    UNITS_FIX,
    may_start_units,
    read_exit,
    running_under_systemd,
    unit_name,
)

from .fake_llama import FakeLlama
from .helpers import wait_until
from .workspace import drop, make_workspace, result_document, run_id, running


def check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], agent: dict[str, Any]
) -> tuple[int, str]:
    config = {"orchestrator": {"model": "m", "port": 1}, "math": {"model": "m", "port": 2},
              "agents": {"ml_meta_agent": {"argv": ["/bin/true"], **agent}}}  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code = main(["check-config", "--config", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "prop",
    ["ExecStartPre=/bin/sh -c id", "User=root", "Environment=LD_PRELOAD=/x", "MemoryMax",
     "RuntimeMaxSec=infinity", "StandardOutput=file:/etc/passwd"],
)  # fmt: skip
def test_a_property_outside_the_allowlist_is_refused_at_config_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], prop: str
) -> None:
    code, err = check_config(tmp_path, capsys, {"properties": ["MemoryMax=8G", prop]})
    assert code == 2
    assert err.startswith("config: agents.ml_meta_agent.properties: ")
    assert f"{prop!r}: not an allowed unit property" in err and "MemoryMax" in err


def test_allowed_properties_a_user_and_a_line_break(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    allowed = {"properties": ["MemoryMax=8G", "CPUQuota=200%", "DeviceAllow=/dev/nvidia0 rw"],
               "user": "prng-agent", "group": "video"}  # fmt: skip
    assert check_config(tmp_path, capsys, allowed) == (0, "")
    code, err = check_config(tmp_path, capsys, {"properties": ["MemoryMax=8G\nExecStart=/x"]})
    assert code == 2 and "MemoryMax: the value holds a line break" in err
    code, err = check_config(tmp_path, capsys, {"user": "root; rm -rf /"})
    assert code == 2 and "agents.ml_meta_agent.user" in err


def test_unit_names_are_made_of_unit_name_characters() -> None:
    assert unit_name("step3_20261125_193000_abc123") == (
        "prng-agent-step3_20261125_193000_abc123.service"
    )
    assert unit_name(".a b/-") == r"prng-agent-\x2ea\x20b\x2f\x2d.service"


def test_exit_files_read_as_exit_codes(tmp_path: Path) -> None:
    """What ExecStopPost= writes: $SERVICE_RESULT $EXIT_CODE $EXIT_STATUS."""
    cases = {"success exited 0": ("success", 0), "exit-code exited 7": ("exit-code", 7),
             "signal killed TERM": ("signal", -15), "timeout killed TERM": ("timeout", -15),
             "core-dump dumped SEGV": ("core-dump", -11), "exit-code  ": (None, None)}  # fmt: skip
    path = tmp_path / "k.exit"
    for text, expected in cases.items():
        path.write_text(text + "\n")
        assert read_exit(path) == expected, text
    assert read_exit(tmp_path / "missing.exit") == (None, None)


def test_auto_is_local_outside_systemd_and_systemd_is_refused_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    settings = DaemonSettings(state_dir=tmp_path, logs_dir=tmp_path)
    choice = choose_launcher(settings)
    assert choice == LauncherChoice("local", "not started by systemd (no INVOCATION_ID)")
    assert make_launcher(settings, choice, lambda *_: None).kind == "local"
    local = settings.model_copy(update={"launcher": "local"})
    assert choose_launcher(local) == LauncherChoice("local", "configured")
    forced = settings.model_copy(update={"launcher": "systemd"})
    with pytest.raises(ConfigError) as refused:
        choose_launcher(forced)
    assert refused.value.problems == [
        "config: daemon.launcher: systemd cannot be used: not started by systemd (no INVOCATION_ID)"
    ]


DENIED = "Failed to start transient service unit: Access denied"
# Stand-ins for systemd-run on PATH: what systemd 252 with the shipped polkit rule answers, one
# that starts the unit, and one whose bus never answers. Each records its arguments.
STAND_INS = {
    "denied": f'echo "$@" > "$0.args"; echo "{DENIED}" >&2; exit 1',
    "allowed": 'echo "$@" > "$0.args"; exit 0',
    "silent": 'echo "$@" > "$0.args"; exec sleep 600',
}


def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> Path:
    program = tmp_path / kind / "systemd-run"
    program.parent.mkdir()
    program.write_text(f"#!/bin/sh\n{STAND_INS[kind]}\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{program.parent}:{os.environ['PATH']}")
    return program


def test_the_probe_starts_one_harmless_unit_and_says_why_it_may_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    denied = stand_in(tmp_path, monkeypatch, "denied")
    said = may_start_units()
    assert said is not None and said.endswith(f".service: {DENIED}"), said
    args = denied.with_name("systemd-run.args").read_text().split()
    assert "--wait" in args and "--no-ask-password" in args and "--collect" in args
    assert f"--uid={os.getuid()}" in args and args[-2:] == ["--", "/bin/true"]
    [unit] = [a.removeprefix("--unit=") for a in args if a.startswith("--unit=")]
    assert unit.startswith("prng-agent-probe-"), "a name the polkit rule's pattern covers"
    assert said == f"systemd-run {unit}: {DENIED}"
    stand_in(tmp_path, monkeypatch, "allowed")
    assert may_start_units() is None
    stand_in(tmp_path, monkeypatch, "silent")
    assert may_start_units(timeout=0.5).endswith(": no answer from systemd within 0.5 s")


def test_auto_falls_back_to_local_with_a_warning_and_systemd_is_refused_when_units_are_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd (the check itself is tested above) and a probe that is refused."""
    stand_in(tmp_path, monkeypatch, "denied")
    settings = DaemonSettings(state_dir=tmp_path, logs_dir=tmp_path)
    with capture_logs() as logs:
        choice = choose_launcher(settings, under_systemd=lambda: None)
    assert choice.kind == "local"
    assert choice.reason.startswith("systemd may not be used: systemd-run prng-agent-probe-")
    assert choice.reason.endswith(f"{DENIED}; {UNITS_FIX}")
    assert logs == [{"event": "launcher.selected", "log_level": "warning", "launcher": "local",
                     "reason": choice.reason}]  # fmt: skip
    forced = settings.model_copy(update={"launcher": "systemd"})
    with pytest.raises(ConfigError) as refused:
        choose_launcher(forced, under_systemd=lambda: None)
    [line] = refused.value.problems
    assert line.startswith("config: daemon.launcher: systemd cannot be used: systemd-run ")
    assert line.endswith(f'{DENIED}; {UNITS_FIX}, or set daemon.launcher to "local"')
    stand_in(tmp_path, monkeypatch, "allowed")
    for setting in ("auto", "systemd"):
        chosen = choose_launcher(
            settings.model_copy(update={"launcher": setting}), under_systemd=lambda: None
        )
        assert chosen.kind == "systemd"


def test_a_process_that_merely_inherited_a_services_environment_is_not_the_service() -> None:
    """A test run inside a CI runner's unit has its INVOCATION_ID, not its SYSTEMD_EXEC_PID."""
    inherited = {"INVOCATION_ID": "0123", "SYSTEMD_EXEC_PID": str(os.getppid())}
    assert running_under_systemd(inherited) == (
        "not the process systemd started (SYSTEMD_EXEC_PID is not our pid)"
    )
    assert running_under_systemd({}) == "not started by systemd (no INVOCATION_ID)"


def test_the_local_launcher_refuses_a_user_it_cannot_switch_to(tmp_path: Path) -> None:
    launcher = LocalLauncher(tmp_path / "launches", tmp_path / "logs", lambda *_: None)
    agent = AgentConfig(argv=("/bin/true",), user="prng-agent")
    launch = Launch(AgentRun(1, "k" * 32, "step3_20260101_000000_000001", "a"), agent, {})
    with pytest.raises(AgentFailed, match="`user` needs the systemd launcher"):
        asyncio.run(launcher.start(launch))
    assert not launcher.was_launched("k" * 32), "nothing started, nothing marked"


def test_stop_agent_ends_a_local_agent_listed_by_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    ws = make_workspace(tmp_path, fake.port)
    ws.edit_config(lambda c: c["agents"]["full_scoring_agent"].update(argv=["sleep", "600"]))
    rid = run_id(2, 1)

    def cli(*args: str) -> tuple[int, str, str]:
        code = main([args[0], "--config", str(ws.config_path), *args[1:]])
        out, err = capsys.readouterr()
        return code, out, err

    with running(ws):
        drop(ws.results, "s2.json", result_document(2, rid))
        report = wait_until(
            lambda: (r := json.loads(cli("status", "--json")[1]))["agents"] and r, 15,
            what="the agent in status",
        )  # fmt: skip
        [agent] = report["agents"]
        assert agent == {"run_id": rid, "agent": "full_scoring_agent", "pid": agent["pid"]}
        shown = cli("status")[1]
        assert f"  {rid}  full_scoring_agent  pid {agent['pid']}" in shown
        assert report["launcher"]["kind"] == "local", "with the reason it was chosen"
        assert f"\nlauncher: local ({report['launcher']['reason']})\n" in shown
        said = cli("stop-agent", rid)
        assert said == (
            0,
            f"{rid}: sent SIGTERM to agent full_scoring_agent (pid {agent['pid']})\n",
            "",
        )
        wait_until(lambda: ws.events("agent.exited"), 15, what="the agent's end")
        assert ws.events("agent.exited")[0]["exit_code"] == -15
        assert cli("stop-agent", rid) == (1, "", f"{rid}: no running agent\n")
