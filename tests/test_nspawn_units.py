"""Agents as transient units under a real systemd (the container of test_nspawn_e2e), installed
as systemd/README.md says: the daemon as prng-llm, polkitd with the shipped rule. systemd 252
names no unit to polkit for a transient start, so the shipped rule alone does not let the daemon
start units: `auto` runs agents locally and says why, an explicit `systemd` is refused at start.
With the opt-in rule for 252/255 (prng-llm-daemon-transient.rules) agents are units.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from prng_daemon.document.pipeline import PIPELINE
from prng_daemon.handlers.act.systemd import probe_argv

from .helpers import wait_until
from .test_nspawn_e2e import MISSING, PY, REPO, UNIT, VENV, Container, booted, drop, install
from .test_nspawn_e2e import container as container  # the fixture
from .workspace import result_document, run_id

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

OUT = "/srv/agent-out"
# The agent: says who it is, writes outside the daemon's ReadWritePaths, waits for its go file,
# exits 7. "$1" and "$(id -un)" reach the shell as written: systemd does not expand them.
AGENT = (
    'echo "agent $1 as $(id -un)"; touch "/srv/agent-out/$1";'
    ' while [ ! -e "/srv/agent-out/$1.go" ]; do sleep 0.1; done; exit 7'
)
AGENT_CONFIG = {
    "argv": ["/bin/sh", "-c", AGENT, "agent", "{parent_run_id}"],
    "user": "prng-agent",
    "properties": ["MemoryMax=256M", "CPUQuota=50%"],
}
ALLOWED = ("prng-llm-daemon.rules", "prng-llm-daemon-transient.rules")
"""The shipped rule and the opt-in one for systemd 252/255 (what it grants: README)."""
CONFIG = "/etc/prng-llm-daemon/config.json"
TRIXIE = Path(os.environ.get("NSPAWN_ROOT_TRIXIE", REPO / ".cache" / "nspawn-root-trixie"))
"""A Debian 13 root (systemd 257): NSPAWN_SUITE=trixie scripts/nspawn-root.sh TRIXIE."""


# SystemdLauncher by itself, in the container: the same launch twice, the same launch whose marker
# is not there yet (the unit still is), a user that does not exist, a program that cannot be
# executed, a timeout (RuntimeMaxSec=), and arguments systemd must pass on unchanged.
LAUNCHER = """
import asyncio, json, pathlib, subprocess, sys, tempfile
from prng_daemon.config import AgentConfig
from prng_daemon.errors import AgentFailed
from prng_daemon.handlers.act.launcher import AgentRun, Launch
from prng_daemon.handlers.act.systemd import SystemdLauncher

async def main():
    launcher = SystemdLauncher(pathlib.Path(tempfile.mkdtemp(dir="/var/lib")), lambda *a: None)
    said = {}
    argv = ("/bin/sh", "-c", 'echo "[$1] [$2]"; exec sleep 600', "sh", "a$HOME${{X}}$$", "%n %%")
    launch = Launch(AgentRun(1, "k" * 32, "step9_x", "a"), AgentConfig(argv=argv), {})
    said["pid"] = await launcher.start(launch)
    for attempt in ("again", "no marker"):
        if attempt == "no marker":
            launcher.marker("k" * 32).rmdir()
        try:
            await launcher.start(launch)
        except AgentFailed as exc:
            said[attempt] = [type(exc).__name__, str(exc)]
    bad = pathlib.Path("/var/lib/bad-agent")
    bad.write_text("#!/nonexistent\\n")
    bad.chmod(0o755)
    for name, config in {"no user": AgentConfig(argv=("/bin/true",), user="nosuchuser"),
                         "bad exec": AgentConfig(argv=(str(bad),))}.items():
        try:
            await launcher.start(Launch(AgentRun(2, "u" * 32, "step9_y", "a"), config, {}))
        except AgentFailed as exc:
            said[name] = [type(exc).__name__, str(exc), launcher.was_launched("u" * 32)]
    await launcher.stop()
    # timeout_seconds is the unit's RuntimeMaxSec=: systemd stops it, its exit file says so.
    ended = asyncio.get_running_loop().create_future()
    timed = SystemdLauncher(launcher.marker("t").parent, lambda *a: ended.set_result(a), 0.2)
    hung = AgentConfig(argv=("/bin/sleep", "600"), timeout_seconds=1)
    await timed.start(Launch(AgentRun(3, "t" * 32, "step9_z", "a"), hung, {}))
    _, _, said["timeout"], seconds = await asyncio.wait_for(ended, 20)
    said["timeout_result"] = (timed.exit_file("t" * 32).read_text().split()[0], seconds < 5)
    print(json.dumps(said))

asyncio.run(main())
"""


def agent_unit(rid: str) -> str:
    return f"prng-agent-{rid}.service"


def unit_state(box: Container, unit: str) -> str:
    return box.run("systemctl", "show", unit, "-p", "ActiveState", "--value").strip()


def exited(box: Container, rid: str) -> list[dict[str, object]]:
    return [e for e in box.events() if e["event"] == "agent.exited" and e.get("run_id") == rid]


def started(box: Container, rid: str) -> None:
    wait_until(
        lambda: any(e["event"] == "agent.started" and e.get("run_id") == rid
                    for e in box.events()),
        20, interval=0.2, what=f"agent.started for {rid}",
    )  # fmt: skip


def test_agents_are_units_that_outlive_the_daemon_and_report_their_real_exit(
    container: Container,
) -> None:
    box = container
    box.run("systemd-sysusers", "--inline", 'u prng-agent - "an agent"')
    box.run("install", "-d", "-o", "prng-agent", "-m", "0755", OUT)
    install(box, {row.agent: AGENT_CONFIG for row in PIPELINE}, "auto", rules=ALLOWED)
    box.run("systemctl", "start", UNIT)
    assert box.show("User") == "prng-llm"
    [selected] = [e for e in box.events() if e["event"] == "launcher.selected"]
    assert (selected["launcher"], selected["priority"]) == ("systemd", "6"), selected
    assert selected["reason"] == "a probe unit started: the daemon may start units"

    # One result file: exactly one unit, named after the run, as its user, logged, limited.
    rid = run_id(2, 1)
    drop(box, "r.json", result_document(2, rid))
    started(box, rid)
    unit = agent_unit(rid)
    wait_until(lambda: box.run("test", "-e", f"{OUT}/{rid}", check=False) == "" and
               box.run("stat", "-c", "%U", f"{OUT}/{rid}", check=False).strip(), 10,
               interval=0.1, what="the agent's file")  # fmt: skip
    assert box.run("stat", "-c", "%U", f"{OUT}/{rid}").strip() == "prng-agent"
    listed = box.run("systemctl", "list-units", "--plain", "--no-legend", "prng-agent-*")
    assert [line.split()[0] for line in listed.splitlines()] == [unit]
    assert unit_state(box, unit) == "active"
    shown = box.run("systemctl", "show", unit, "-p", "MemoryMax", "-p", "CPUQuotaPerSecUSec",
                    "-p", "User", "-p", "RuntimeMaxUSec")  # fmt: skip
    assert "MemoryMax=268435456" in shown and "CPUQuotaPerSecUSec=500ms" in shown, shown
    assert "User=prng-agent" in shown and "RuntimeMaxUSec=1d" in shown, shown
    wait_until(lambda: f"agent {rid} as prng-agent" in box.run(
        "journalctl", "-u", unit, "-o", "cat", "--no-pager"), 10, interval=0.2)  # fmt: skip

    # The same content under another name: the same run, its unit exists; no second agent.
    drop(box, "r-copy.json", result_document(2, rid))
    wait_until(lambda: any(e["event"] == "agent.failed" for e in box.events()), 15,
               interval=0.2, what="the second launch refused")  # fmt: skip
    assert box.run("pgrep", "-c", "-u", "prng-agent", "-x", "sh").strip() == "1"
    status = box.run(
        "env", f"PYTHONUSERBASE={VENV}", f"/usr/bin/{PY}", "-m", "prng_daemon", "status",
        "--config", CONFIG, check=False,
    )  # fmt: skip
    assert f"{rid}  full_scoring_agent  unit {unit}" in status, status
    assert "\nlauncher: systemd (a probe unit started: the daemon may start units)\n" in status

    # A restart of the daemon: the unit runs on, is adopted, its end reported with its exit.
    pid = box.run("systemctl", "show", unit, "-p", "MainPID", "--value").strip()
    box.run("systemctl", "restart", UNIT)
    assert unit_state(box, unit) == "active"
    assert box.run("systemctl", "show", unit, "-p", "MainPID", "--value").strip() == pid
    assert any(e["event"] == "agent.adopted" and e.get("run_id") == rid for e in box.events())
    box.run("touch", f"{OUT}/{rid}.go")
    wait_until(lambda: exited(box, rid), 15, interval=0.2, what="agent.exited after restart")
    assert exited(box, rid)[0]["exit_code"] == "7"

    # An agent that ends while the daemon is stopped: its real exit at the next start.
    rid3 = run_id(3, 1)
    drop(box, "r3.json", result_document(3, rid3, parent_run_id=rid))
    started(box, rid3)
    box.run("systemctl", "stop", UNIT)
    assert unit_state(box, agent_unit(rid3)) == "active", "stopping the daemon stops no agent"
    box.run("touch", f"{OUT}/{rid3}.go")
    wait_until(lambda: unit_state(box, agent_unit(rid3)) == "inactive", 10, interval=0.1)
    box.run("systemctl", "start", UNIT)
    wait_until(lambda: exited(box, rid3), 15, interval=0.2, what="the exit recorded while down")
    assert exited(box, rid3)[0]["exit_code"] == "7"
    assert not any(e["event"] == "agent.lost" for e in box.events())

    # stop-agent: systemctl stop of its unit; the daemon records the signal.
    rid4 = run_id(4, 1)
    drop(box, "r4.json", result_document(4, rid4, parent_run_id=rid3))
    started(box, rid4)
    said = box.run(
        "env", f"PYTHONUSERBASE={VENV}", f"/usr/bin/{PY}", "-m", "prng_daemon", "stop-agent",
        rid4, "--config", CONFIG,
    )  # fmt: skip
    assert said.strip() == f"{rid4}: stopped {agent_unit(rid4)}"
    wait_until(lambda: exited(box, rid4), 15, interval=0.2, what="agent.exited after stop")
    assert exited(box, rid4)[0]["exit_code"] == "-15"
    launched = [e["run_id"] for e in box.events() if e["event"] == "agent.started"]
    assert launched == [rid, rid3, rid4], "each launch once, across two restarts"
    print("\n".join(box.journal()[-40:]))


def test_the_systemd_launcher_knows_its_own_launch_undoes_a_failed_one_and_times_out(
    container: Container,
) -> None:
    box = container
    out = box.run("env", f"PYTHONUSERBASE={VENV}", f"/usr/bin/{PY}", "-c", LAUNCHER)
    said = json.loads(out.splitlines()[-1])
    assert said["pid"] > 0
    assert said["again"] == ["AlreadyLaunched", "the launch for this file version already"
                             " happened; not starting it twice"]  # fmt: skip
    assert said["no marker"] == ["AlreadyLaunched",
                                 "already launched as prng-agent-step9_x.service"]  # fmt: skip
    assert said["no user"] == ["AgentFailed", "agent a: no such user: nosuchuser", False]
    assert said["bad exec"] == [
        "AgentFailed",
        "agent a: systemd-run prng-agent-step9_y.service: exit status 203 (EXEC: cannot execute"
        " the program); journalctl -u prng-agent-step9_y.service",
        False,
    ], "a unit whose agent never ran leaves the launch launchable (its marker removed)"
    assert said["timeout"] == -15 and said["timeout_result"] == ["timeout", True]
    logged = box.run("journalctl", "-u", "prng-agent-step9_x", "-o", "cat", "--no-pager")
    assert "[a$HOME${X}$$] [%n %%]" in logged, logged
    box.run("systemctl", "stop", "prng-agent-step9_x.service")


def test_with_only_the_shipped_rule_auto_runs_agents_locally_and_systemd_is_refused(
    container: Container,
) -> None:
    """systemd 252 + the shipped polkit rule: the probe unit is refused, and the daemon says so."""
    box = container
    install(box)  # the shipped files only; launcher "auto", as config.example.json
    box.run("systemctl", "start", UNIT)
    [selected] = [e for e in box.events() if e["event"] == "launcher.selected"]
    assert (selected["launcher"], selected["priority"]) == ("local", "4"), "a warning"
    reason = str(selected["reason"])
    assert reason.startswith("systemd may not be used: systemd-run prng-agent-probe-"), reason
    assert "Access denied" in reason or "authentication required" in reason, reason
    assert reason.endswith(
        'allow it with the polkit rules of systemd/README.md ("Agents as units")'
    )
    said = [line for line in box.journal() if line.startswith("agents start with the ")]
    assert said == [f"agents start with the local launcher: {reason}"]
    status = box.run("env", f"PYTHONUSERBASE={VENV}", f"/usr/bin/{PY}", "-m", "prng_daemon",
                     "status", "--config", CONFIG)  # fmt: skip
    assert f"\nlauncher: local ({reason})\n" in status, status
    assert box.run(
        "systemctl", "list-units", "--all", "--plain", "--no-legend", "prng-agent-*"
    ) == (""), "the probe left no unit"

    # A dropped file still starts its agent: a child of the daemon, in its cgroup, as prng-llm.
    rid = run_id(2, 1)
    drop(box, "r.json", result_document(2, rid))
    started(box, rid)
    [event] = [e for e in box.events() if e["event"] == "agent.started"]
    assert str(event["started_as"]).startswith("pid "), event
    assert box.run("pgrep", "-u", "prng-llm", "-x", "sleep", check=False).strip()

    # An explicit `systemd` that may not start units: the start is refused, in one line.
    config = json.loads(box.run("cat", CONFIG))
    config["daemon"]["launcher"] = "systemd"
    box.write(CONFIG, json.dumps(config), "0640", "prng-llm")
    box.run("systemctl", "stop", UNIT)
    cursor = box.run("journalctl", "-u", UNIT, "-n", "0", "--show-cursor", "--no-pager")
    after = cursor.strip().rsplit("cursor: ", 1)[-1]
    assert box.run("systemctl", "start", UNIT, check=False) == ""
    assert box.show("Result") == "exit-code" and box.show("ExecMainStatus") == "2"
    refused = [line for line in box.journal("--after-cursor", after) if "daemon.launcher" in line]
    assert len(refused) == 1, refused
    assert refused[0].startswith("config: daemon.launcher: systemd cannot be used: systemd-run ")
    assert refused[0].endswith('("Agents as units"), or set daemon.launcher to "local"')
    assert not any(e["event"] == "daemon.started" for e in box.events("--after-cursor", after))


def test_on_debian_13_the_shipped_rule_alone_lets_the_daemon_user_start_agent_units(
    tmp_path: Path,
) -> None:
    """systemd 257 names a transient unit to polkit: the shipped rule allows the daemon's probe
    and its agents' units by name, and no other transient unit. (Its Python is not the venv's:
    the probe's own command line is run, as the daemon's user.)"""
    if not (TRIXIE / ".nspawn-root-complete").exists():
        missing = f"no Debian 13 root at {TRIXIE}: NSPAWN_SUITE=trixie scripts/nspawn-root.sh"
        if os.environ.get("PRNG_REQUIRE_NSPAWN") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    with booted(tmp_path / "nspawn.log", TRIXIE) as box:
        version = int(box.run("systemctl", "--version").split()[1])
        assert version >= 257, version
        box.run("install", "-m", "0644", f"{REPO}/systemd/{UNIT}.sysusers",
                f"/usr/lib/sysusers.d/{UNIT}.conf")  # fmt: skip
        box.run("systemd-sysusers")
        box.run("install", "-m", "0644", f"{REPO}/systemd/{UNIT}.rules",
                f"/etc/polkit-1/rules.d/50-{UNIT}.rules")  # fmt: skip
        said = {}
        for unit in ("prng-agent-probe-0123456789ab.service", agent_unit(run_id(3, 1)),
                     "prng-llm-daemon-probe.service", "sshd-x.service"):  # fmt: skip
            argv = ("runuser", "-u", "prng-llm", "--", *probe_argv(unit, "prng-llm"))
            said[unit] = box.run(*argv, check=False, stderr=True).strip()
        assert list(said.values()) == [
            "",
            "",
            *["Failed to start transient service unit: Interactive authentication required."] * 2,
        ]
        assert box.run("systemctl", "list-units", "--all", "--plain", "--no-legend",
                       "prng-agent-*") == "", "collected"  # fmt: skip
