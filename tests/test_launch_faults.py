"""Launchers under faults (issue 27): no agent runs unwatched, and no valid result is rejected
for a fault that passes. Real daemon processes, real agents, real SQLite; a fake LLM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import sqlite3
import sys
from pathlib import Path

from structlog.testing import capture_logs

from prng_daemon.config import AgentConfig, load_config
from prng_daemon.handlers.act.launcher import AgentRun, Launch
from prng_daemon.handlers.act.local import LocalLauncher
from prng_daemon.ledger import Entry, Ledger, State
from prng_daemon.service import status

from . import workspace
from .fake_llama import FakeLlama
from .helpers import free_port, until, wait_until
from .test_daemon import HeldExplanation
from .test_engine_sweep import _engine
from .test_status_cli import fill, small_tmpfs
from .workspace import Workspace, drop, make_workspace, result_document, run_id

WAITING_AGENT = """\
import os, pathlib, sys, time
marker_dir = pathlib.Path(os.environ["MARKERS"])
(marker_dir / f"{os.environ['PRNG_LAUNCH_ID']}-{os.getpid()}").write_text("")
deadline = time.monotonic() + 300  # a failed test must not leave it running for ever
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.05)
"""
"""An agent that runs until the file named by its argument exists (at most 5 minutes)."""


def _waiting_agents(ws: Workspace, go: Path) -> None:
    script = ws.root / "waiting_agent.py"
    script.write_text(WAITING_AGENT)
    argv = [sys.executable, str(script), str(go)]
    ws.edit_config(lambda c: c["agents"]["full_scoring_agent"].update(argv=argv))


def _rows(ws: Workspace) -> list[Entry]:
    ledger = Ledger(ws.root / "state" / "ledger.sqlite3")
    try:
        return ledger.recent(1000)
    finally:
        ledger.close()


def test_agents_launched_just_before_a_sigkill_are_watched_after_the_restart(
    tmp_path: Path,
) -> None:
    """Case 1: the daemon dies with 6 agents started and their records not yet written (the
    explanations are held). After the restart every agent is watched: its pid in the ledger,
    listed by `status`, its end logged; none is launched twice."""
    n = 6
    go = tmp_path / "go"
    with HeldExplanation() as fake:
        server = {"parallel": n}
        ws = make_workspace(tmp_path / "ws", fake.port, orchestrator=server, math=server)
        _waiting_agents(ws, go)
        proc = ws.start()
        try:
            workspace.wait_ready(ws)
            for k in range(n):
                drop(ws.results, f"r{k}.json", result_document(2, run_id(2, 100 + k)))
            wait_until(lambda: len(ws.launches()) == n, 30, what=f"{n} agents started")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert ws.ledger_states() == {"launching": n}
            fake.release.set()
            proc = ws.start()
            wait_until(lambda: len(ws.events("agent.adopted")) == n, 20, what="adopted")
            config = load_config(ws.config_path)
            wait_until(lambda: len(status.collect(config)["agents"]) == n, 20, what="status")
            assert all(e.state is State.ACTED and e.pid for e in _rows(ws)), _rows(ws)
            go.touch()
            wait_until(lambda: len(ws.events("agent.exited")) == n, 20, what="every end seen")
        finally:
            go.touch()
            workspace.stop(proc)
    pids = {int(name.split("-")[1]) for name in ws.launches()}
    assert {e["pid"] for e in ws.events("agent.adopted")} == pids
    assert len(ws.launches()) == n, "none launched twice"
    assert not ws.events("agent.lost")


def test_an_agent_whose_pid_never_reached_the_ledger_is_found_by_its_launch_id(
    tmp_path: Path,
) -> None:
    """The microseconds between the spawn and the ledger: a restart finds the agent in /proc
    by its PRNG_LAUNCH_ID, records its pid and watches it."""
    go = tmp_path / "go"
    ws = make_workspace(tmp_path / "ws", free_port())
    _waiting_agents(ws, go)

    async def main() -> None:
        engine = _engine(ws, "proceed")
        try:
            drop(ws.results, "r.json", result_document(2, run_id(2, 120)))
            assert await engine.process(ws.results / "r.json", "moved")
            [entry] = engine.ledger.recent(1)
            assert entry.state is State.ACTED and entry.pid
            await engine.launcher.stop()
            # What a crash right after the spawn leaves: the intent, its marker, no pid.
            with contextlib.closing(sqlite3.connect(engine.ledger.path)) as db, db:
                db.execute("UPDATE files SET state = 'launching', pid = NULL")
            with capture_logs() as logs:
                engine.recovery.reconcile(engine.config)
            [adopted] = [e for e in logs if e["event"] == "agent.adopted"]
            assert adopted["pid"] == entry.pid
            after = engine.ledger.get(entry.id)
            assert (after.state, after.pid, after.reason) == (
                State.ACTED, entry.pid, "launched before a restart",
            )  # fmt: skip
            go.touch()
            await until(lambda: engine.ledger.get(entry.id).ended, 20, "the agent's end")
            os.waitpid(entry.pid, 0)  # adopted agents are not reaped: this one is ours
        finally:
            go.touch()
            await engine.launcher.stop()
            engine.ledger.close()

    asyncio.run(main())


def test_a_watch_without_a_file_descriptor_polls_instead_of_dying(tmp_path: Path) -> None:
    """Case 2's silent death: pidfd_open fails with EMFILE. The watch says so at error, polls
    /proc, and still reports the agent's end with its exit code."""
    go = tmp_path / "go"
    script = tmp_path / "agent.py"
    script.write_text(
        "import os, sys, time\n"
        "deadline = time.monotonic() + 300\n"
        "while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "sys.exit(3)\n"
    )
    ended: list[tuple[int, int | None]] = []

    async def main() -> None:
        launcher = LocalLauncher(
            tmp_path / "markers", tmp_path / "logs", lambda i, p, c, d, *_: ended.append((p, c))
        )
        config = AgentConfig(argv=(sys.executable, str(script), str(go)))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        with capture_logs() as logs:
            pid = await launcher.start(Launch(AgentRun(1, "k", "run", "a"), config, {}))
            # No descriptor left for the watch, which runs at the loop's next turn.
            lowest_free = os.open(os.devnull, os.O_RDONLY)
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                await asyncio.sleep(0)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            go.touch()
            await until(lambda: ended, 20, "the agent's end")
        await launcher.stop()
        [degraded] = [e for e in logs if e["event"] == "agent.watch_degraded"]
        assert degraded["log_level"] == "error" and "Too many open files" in degraded["error"]
        assert ended == [(pid, 3)]

    asyncio.run(main())


def _lowest_free_fd(pid: int) -> int:
    used = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(used) + 1)) - used)


SLOW_SCANS = {"rescan_interval_seconds": 3600, "transient_deadline_seconds": 3600}
"""Neither the periodic scan nor the sweep of stuck rows can be what brings a file back."""


def test_files_met_by_the_open_files_limit_wait_for_it_and_flow_once_it_is_raised(
    tmp_path: Path, fake: FakeLlama
) -> None:
    """Case 2: no descriptor left while 12 valid files arrive. None is quarantined; one warning
    says the files wait; once the limit is raised (no restart, no touch of the files) each is
    decided and launched once, within seconds."""
    n = 12
    ws = make_workspace(tmp_path, fake.port, daemon=SLOW_SCANS)
    proc = ws.start()
    try:
        workspace.wait_ready(ws)
        limits = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (_lowest_free_fd(proc.pid), limits[1]))
        try:
            for k in range(n):
                drop(ws.results, f"r{k}.json", result_document(2, run_id(2, 130 + k)))
            met = ("result.retry_later", "result.rejected")  # the fault met, either way
            wait_until(lambda: [e for e in ws.events() if e["event"] in met], 20, what="EMFILE")
            assert "quarantined" not in ws.ledger_states()
        finally:
            resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, limits)
        wait_until(lambda: ws.finished(n), 30, what="every file settled")
        wait_until(lambda: len(ws.launches()) == n, 20, what="every agent started")
        wait_until(lambda: ws.events("result.retry_recovered"), 10, what="the episode's end")
    finally:
        assert workspace.stop(proc) == 0
    assert ws.ledger_states() == {"acted": n}
    assert len(ws.launches()) == n
    [waiting] = [e for e in ws.events("result.retry_later") if e["level"] == "warning"]
    assert "Too many open files" in waiting["error"]
    assert not ws.events("result.rejected") and not ws.events("result.crashed")


def test_files_stopped_by_a_full_disk_go_on_seconds_after_it_is_freed(
    tmp_path: Path, fake: FakeLlama
) -> None:
    """Issue 24 item 6: a full state disk stops 4 files mid-way; freed, they are taken up at
    the next retry (seconds), not at the transient deadline (an hour here)."""
    n = 4
    ws = make_workspace(tmp_path, fake.port, daemon=SLOW_SCANS)
    with small_tmpfs(tmp_path / "state", "16m") as state:
        proc = ws.start()
        try:
            workspace.wait_ready(ws)
            fill(state / "filler")
            try:
                for k in range(n):
                    drop(ws.results, f"r{k}.json", result_document(2, run_id(2, 140 + k)))
                met = ("result.retry_later", "result.io_failed")  # the fault met, either way
                wait_until(lambda: [e for e in ws.events() if e["event"] in met], 20, what="met")
            finally:
                (state / "filler").unlink()
            wait_until(lambda: ws.finished(n), 30, what="every file settled")
            wait_until(lambda: len(ws.launches()) == n, 20, what="every agent started")
            assert ws.ledger_states() == {"acted": n}
        finally:
            assert workspace.stop(proc) == 0
    [waiting] = [e for e in ws.events("result.retry_later") if e["level"] == "warning"]
    assert "No space left on device" in waiting["error"] or "full" in waiting["error"]
    assert not ws.events("result.stuck") and not ws.events("result.resumed")


def test_directories_removed_by_a_clean_up_are_made_again_and_launches_go_on(
    tmp_path: Path, fake: FakeLlama
) -> None:
    """Case 3: `logs_dir/agents` and `decisions/` removed while the daemon runs. The next
    launch makes them again (one warning naming them) and starts its agent, with its log and
    its record; no restart, no hand-made directory."""
    ws = make_workspace(tmp_path, fake.port)
    agent_logs, decisions = ws.root / "logs" / "agents", ws.results / "decisions"
    with workspace.running(ws):
        drop(ws.results, "a.json", result_document(2, run_id(2, 150)))
        wait_until(lambda: ws.finished(1), 20, what="the first launch")
        shutil.rmtree(agent_logs)
        shutil.rmtree(decisions)
        drop(ws.results, "b.json", result_document(2, run_id(2, 151)))
        wait_until(lambda: ws.finished(2), 20, what="the second file settled")
        wait_until(lambda: len(ws.launches()) == 2, 20, what="its agent started")
    assert ws.ledger_states() == {"acted": 2}
    [made] = ws.events("agent.dir_made")
    assert made["level"] == "warning" and made["directories"] == [str(agent_logs)]
    assert list(agent_logs.glob("*.log")) and list(decisions.glob("b.*.decision.json"))


def test_an_agent_logs_directory_replaced_by_a_link_is_not_written_through(
    tmp_path: Path, fake: FakeLlama
) -> None:
    """Made again only where nothing is: a link in its place fails the launch, naming it."""
    ws = make_workspace(tmp_path, fake.port)
    agent_logs = ws.root / "logs" / "agents"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with workspace.running(ws):
        wait_until(agent_logs.is_dir, 10, what="the daemon's logs dir")
        agent_logs.rmdir()
        agent_logs.symlink_to(elsewhere / "gone")  # a dangling link: the spawn says ENOENT
        drop(ws.results, "r.json", result_document(2, run_id(2, 152)))
        wait_until(lambda: ws.finished(1), 20, what="the file settled")
    [entry] = _rows(ws)
    assert entry.state is State.FAILED and entry.reason == (
        f"{agent_logs} is a symbolic link or not a directory; nothing is written through it"
    )
    assert list(elsewhere.iterdir()) == [] and not ws.launches()
