"""Launching agents: the local spawn vs a transient unit through systemd-run, and (if dbus-fast
is importable) the same unit through D-Bus directly; the cost of polling N running units.

Runs under the real systemd 252 of tests/test_nspawn_e2e.py's container (root, and its root
built by scripts/nspawn-root.sh). `--inside` is the part that runs in the container.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LAUNCHES = 20
POLLS = 10
POLLED = (1, 5, 20)


async def inside() -> dict[str, Any]:
    from prng_daemon.config import AgentConfig
    from prng_daemon.handlers.act.launcher import AgentRun, Launch
    from prng_daemon.handlers.act.local import LocalLauncher
    from prng_daemon.handlers.act.systemd import SystemdLauncher, show_units

    work = Path(tempfile.mkdtemp(dir="/var/tmp"))
    agent = AgentConfig(argv=("/bin/sleep", "600"))
    local = LocalLauncher(work / "local", work / "logs", lambda *_: None)
    units = SystemdLauncher(work / "units", lambda *_: None)
    spent: dict[str, list[float]] = {"local": [], "systemd-run": [], "dbus": []}
    pids = []
    for i in range(LAUNCHES):
        run = AgentRun(i, f"{i:032x}", f"local{i}", "bench")
        start = time.perf_counter()
        pids.append(await local.start(Launch(run, agent, {})))
        spent["local"].append(time.perf_counter() - start)
    names = []
    for i in range(LAUNCHES):
        run = AgentRun(i, f"{i:032x}", f"bench{i}", "bench")
        start = time.perf_counter()
        await units.start(Launch(run, agent, {}))
        spent["systemd-run"].append(time.perf_counter() - start)
        names.append(f"prng-agent-bench{i}.service")
    polls: dict[str, list[float]] = {}
    for n in POLLED:
        polls[f"systemctl show, {n} units"] = []
        for _ in range(POLLS):
            start = time.perf_counter()
            show_units(names[:n], ("LoadState", "ActiveState"))
            polls[f"systemctl show, {n} units"].append(time.perf_counter() - start)
    try:
        await _dbus(spent["dbus"], polls, names)
    except ImportError:
        spent.pop("dbus")
    for pid in pids:
        os.killpg(pid, signal.SIGTERM)
    subprocess.run(["systemctl", "stop", "prng-agent-*"], check=True)
    await local.stop()
    await units.stop()
    return {"launch": spent, "poll": polls}


async def _dbus(spent: list[float], polls: dict[str, list[float]], names: list[str]) -> None:
    """StartTransientUnit (Type=exec, as systemd-run is asked for) until its job is done."""
    from dbus_fast import BusType, Message, MessageType, Variant
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    manager = {"destination": "org.freedesktop.systemd1", "path": "/org/freedesktop/systemd1",
               "interface": "org.freedesktop.systemd1.Manager"}  # fmt: skip
    removed: dict[str, str] = {}

    def on_message(message: Message) -> None:
        if message.message_type == MessageType.SIGNAL and message.member == "JobRemoved":
            removed[message.body[1]] = message.body[3]

    bus.add_message_handler(on_message)
    # Signals reach this connection only through a match rule; Subscribe makes systemd send them.
    await bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="AddMatch", signature="s",
        body=["type='signal',interface='org.freedesktop.systemd1.Manager',member='JobRemoved'"],
    ))  # fmt: skip
    await bus.call(Message(**manager, member="Subscribe"))
    for i in range(LAUNCHES):
        properties = [
            ["Type", Variant("s", "exec")],
            ["CollectMode", Variant("s", "inactive-or-failed")],
            ["ExecStart", Variant("a(sasb)", [["/bin/sleep", ["/bin/sleep", "600"], False]])],
        ]
        start = time.perf_counter()
        reply = await bus.call(Message(
            **manager, member="StartTransientUnit", signature="ssa(sv)a(sa(sv))",
            body=[f"prng-agent-dbus{i}.service", "fail", properties, []],
        ))  # fmt: skip
        assert reply is not None and reply.message_type == MessageType.METHOD_RETURN, reply
        job = reply.body[0]
        deadline = time.monotonic() + 10
        while job not in removed:
            assert time.monotonic() < deadline, f"no JobRemoved for {job}"
            await asyncio.sleep(0.0005)
        spent.append(time.perf_counter() - start)
        assert removed[job] == "done", removed[job]
    for n in POLLED:
        label = f"D-Bus ListUnitsByNames, {n} units"
        polls[label] = []
        for _ in range(POLLS):
            start = time.perf_counter()
            await bus.call(Message(**manager, member="ListUnitsByNames", signature="as",
                                   body=[names[:n]]))  # fmt: skip
            polls[label].append(time.perf_counter() - start)
    bus.disconnect()


def outside() -> None:
    from bench._common import command_line, save, summary_ms, table
    from tests.test_nspawn_e2e import MISSING, PY, REPO, VENV, booted

    if MISSING:
        raise SystemExit(f"cannot run: {MISSING}")
    with tempfile.TemporaryDirectory() as tmp, booted(Path(tmp) / "nspawn.log") as box:
        out = box.run(
            "env", f"PYTHONUSERBASE={VENV}", f"PYTHONPATH={REPO}", "PYTHONDONTWRITEBYTECODE=1",
            f"/usr/bin/{PY}", f"{REPO}/bench/bench_units.py", "--inside", timeout=300,
        )  # fmt: skip
    data = json.loads(out.splitlines()[-1])  # the last line: log lines may come before
    how = {"local": "LocalLauncher.start (posix_spawn)",
           "systemd-run": "SystemdLauncher.start (systemd-run, then MainPID)",
           "dbus": "dbus-fast StartTransientUnit until JobRemoved"}  # fmt: skip
    launch = {how[k]: summary_ms(v) for k, v in data["launch"].items()}
    poll = {k: summary_ms(v) for k, v in data["poll"].items()}
    headers = ["what", "n", "median ms", "p99 ms", "max ms"]

    def rows(d: dict[str, dict[str, float]]) -> list[list[Any]]:
        return [[k, s["n"], s["median_ms"], s["p99_ms"], s["max_ms"]] for k, s in d.items()]

    save("units", command_line(),
         {"Launch latency (systemd 252 in the container)": table(headers, rows(launch)),
          "Polling running units": table(headers, rows(poll))},
         {"launch": launch, "poll": poll})  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:] == ["--inside"]:
        print(json.dumps(asyncio.run(inside())))
    else:
        outside()
