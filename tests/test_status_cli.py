"""`prng-llm-daemon status / approve / reject` against a running daemon process."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from prng_daemon.cli import main
from prng_daemon.config import load_config
from prng_daemon.ledger import Ledger, State
from prng_daemon.service import status

from .fake_llama import FakeLlama
from .helpers import free_port, wait_until
from .workspace import (
    AGENT,
    Workspace,
    drop,
    make_workspace,
    result_document,
    run_id,
    running,
    stop,
    wait_ready,
)


def cli(capsys: pytest.CaptureFixture[str], ws: Workspace, verb: str, *args: str) -> Any:
    """Run one CLI verb in this process; (exit code, stdout, stderr)."""
    code = main([verb, "--config", str(ws.config_path), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_status_without_a_daemon_says_not_running_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = make_workspace(tmp_path, free_port())
    code, out, _ = cli(capsys, ws, "status")
    assert code == 1
    assert out.splitlines()[0] == "daemon: not running"
    code, out, _ = cli(capsys, ws, "status", "--json")
    assert code == 1 and json.loads(out)["running"] is False


def test_status_of_a_running_daemon_shows_servers_pipeline_runs_and_decisions(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fake: FakeLlama,
    llama_server_bin: Path,
    tiny_model: Path,
) -> None:
    """The orchestrator is a real managed llama-server; math (steps 1 and 2) is the fake."""
    orchestrator = {
        "model": tiny_model.name, "port": free_port(), "managed": True, "context_length": 256,
        "batch_size": 64, "threads": 1, "parallel": 1, "n_gpu_layers": 0,
    }  # fmt: skip
    ws = make_workspace(
        tmp_path, fake.port, orchestrator=orchestrator,
        daemon={"llama_server": str(llama_server_bin), "models_dir": str(tiny_model.parent)},
        health={"ready_poll_interval_seconds": 0.05},
    )  # fmt: skip
    proc = ws.start()
    try:
        wait_ready(ws)
        drop(ws.results, "s1.json", result_document(1, run_id(1, 1)))
        wait_until(lambda: ws.finished(1), 15, what="step 1 decided")
        drop(ws.results, "s2.json", result_document(2, run_id(2, 1), parent_run_id=run_id(1, 1)))
        wait_until(lambda: ws.finished(2), 15, what="step 2 decided")

        def report() -> Any:
            code, out, _ = cli(capsys, ws, "status", "--json")
            return json.loads(out) if code == 0 else None

        # The status file is rewritten within 0.25 s of a change: wait for the one after both.
        published = wait_until(
            lambda: (r := report()) and r["servers"]["orchestrator"]["state"] == "ready"
            and " idle · 2 decided" in r["status"] and r,
            20, what="the orchestrator ready and both files decided in status",
        )  # fmt: skip
        code, text, _ = cli(capsys, ws, "status")
    finally:
        assert stop(proc) == 0
    with capsys.disabled():
        print("\n" + text)
    assert code == 0
    lines = text.splitlines()
    assert lines[0].startswith(
        f"daemon: running (pid {proc.pid}) · orchestrator ready on CPU, math unmanaged · idle ·"
    )
    assert "2 decided, 0 escalated" in lines[0]
    assert lines[1].startswith("  orchestrator: ready on CPU (pid ")
    assert lines[2] == f"  math: not managed by the daemon, at {fake.url}"
    runs = lines.index("pipeline runs:")
    assert lines[runs + 1] == f"  {run_id(1, 1)}: step 2/6 acted (proceed -> full_scoring_agent)"
    decisions = lines[lines.index("last decisions:") + 1 :]
    # Newest first by last update, and an agent's exit updates its row: either order is right.
    assert sorted(line.split()[2:5] for line in decisions) == [
        ["s1.json", "acted", "proceed"],
        ["s2.json", "acted", "proceed"],
    ]
    assert published["running"] is True and published["pid"] == proc.pid
    assert published["servers"]["orchestrator"]["pid"] > 0
    assert published["counts"] == {"acted": 2}
    assert sorted(r["run_id"] for r in published["recent"]) == [run_id(1, 1), run_id(2, 1)]
    code, out, _ = cli(capsys, ws, "status")
    assert code == 1 and out.startswith("daemon: not running"), "stopped is not running"


def test_approve_or_reject_of_a_run_that_is_not_escalated_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    ws = make_workspace(tmp_path, fake.port)
    code, _, err = cli(capsys, ws, "approve", run_id(2, 1))
    assert code == 1 and "no ledger at" in err
    assert not (tmp_path / "state" / "ledger.sqlite3").exists(), "the CLI made a ledger"
    proc = ws.start()
    try:
        wait_ready(ws)
        drop(ws.results, "r.json", result_document(2, run_id(2, 1)))
        wait_until(lambda: ws.finished(1) and ws.launches(), 15)
    finally:
        stop(proc)
    for verb in (["approve"], ["approve", "--retry"], ["reject"]):
        code, out, err = cli(capsys, ws, *verb, run_id(2, 1))
        assert code == 1 and not out
        assert err.strip() == f"{run_id(2, 1)}: no pending escalation (state: acted)"
    code, _, err = cli(capsys, ws, "reject", run_id(2, 99))
    assert code == 1 and "(state: unknown)" in err
    assert len(ws.launches()) == 1


@contextmanager
def escalated(
    tmp_path: Path, fake: FakeLlama, document: dict[str, Any]
) -> Iterator[tuple[Workspace, subprocess.Popen[bytes]]]:
    """A running daemon holding one escalated step-2 result; its own agent shows retry_count."""
    fake.decision = "escalate"
    own = {
        "argv": [sys.executable, str(tmp_path / "agent.py"), "{parent_run_id}", "{step}",
                 "{retry_count}"],
        "env": {"MARKERS": str(tmp_path / "markers")},
    }  # fmt: skip
    ws = make_workspace(tmp_path, fake.port, agents={"scorer_meta_agent": own})
    assert (tmp_path / "agent.py").read_text() == AGENT
    proc = ws.start()
    try:
        wait_ready(ws)
        drop(ws.results, "r.json", document)
        wait_until(lambda: ws.ledger_states() == {"escalated": 1}, 15, what="an escalation")
        yield ws, proc
    finally:
        assert stop(proc) == 0


def approve(capsys: pytest.CaptureFixture[str], ws: Workspace, *args: str) -> float:
    """Run the verb; the seconds until the running daemon launched an agent for it."""
    approved = time.monotonic()
    code, out, _ = cli(capsys, ws, *args)
    verb = "approved for a retry" if "--retry" in args else "approved"
    assert code == 0 and out.startswith(f"{verb}: {args[-1]} -> started "), out
    label = "retry" if "--retry" in args else "proceed"
    assert f"{args[-1]}: kept as a labelled case (right answer: {label};" in out
    wait_until(ws.launches, 10, what="the launch after the approval")
    return time.monotonic() - approved


def test_approved_escalation_launches_the_follow_up_without_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    rid = run_id(2, 1)
    with escalated(tmp_path, fake, result_document(2, rid)) as (ws, proc):
        code, out, _ = cli(capsys, ws, "status")
        assert "pending escalations: 1" in out
        assert f"  {rid}  step 2  r.json: " in out
        assert "resolve with: prng-llm-daemon approve RUN_ID" in out
        seconds = approve(capsys, ws, "approve", rid)
        wait_until(lambda: ws.ledger_states() == {"acted": 1}, 5)
        pid = proc.pid
    with capsys.disabled():
        print(f"\napprove -> follow-up launched in {seconds:.2f}s (daemon pid {pid} throughout)")
    assert seconds < 5
    [launch] = ws.launches()
    assert (ws.markers / launch).read_text().split()[:2] == [rid, "3"], "the follow-up, step 3"
    [record] = (ws.results / "decisions").glob("r.*.decision.json")
    decision = json.loads(record.read_text())
    assert decision["decision"] == "proceed" and decision["approved_by"] == "operator"
    assert decision["agent"] == "full_scoring_agent"


def test_rejected_escalation_is_done_with_no_launch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    rid = run_id(2, 1)
    with escalated(tmp_path, fake, result_document(2, rid)) as (ws, _):
        code, out, _ = cli(capsys, ws, "reject", rid)
        assert (code, out) == (
            0,
            f"rejected: {rid} -> stops here\n"
            f"{rid}: kept as a labelled case (right answer: escalate; 1 cases)\n",
        )
        assert ws.ledger_states() == {"done": 1}, "applied before the CLI returned"
        code, out, _ = cli(capsys, ws, "status")
        assert "pending escalations: 0" in out
    assert not ws.launches()
    assert [e for e in ws.events() if e["event"] == "escalation.rejected"]


def test_approve_retry_runs_the_steps_own_agent_again_with_one_more_retry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    parent = run_id(1, 7)
    document = result_document(2, run_id(2, 1), parent_run_id=parent, retry_count=1)
    with escalated(tmp_path, fake, document) as (ws, _):
        approve(capsys, ws, "approve", "--retry", run_id(2, 1))
    [launch] = ws.launches()
    parent_arg, step_arg, retry_arg = (ws.markers / launch).read_text().split()
    assert (parent_arg, step_arg, retry_arg) == (parent, "2", "2"), "scorer_meta_agent again"


def serving(ws: Workspace) -> bool:
    return status.daemon_state(load_config(ws.config_path))[0] == "running"


def test_approve_of_a_deleted_escalation_is_refused_and_the_daemon_keeps_serving(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    """Issue 12 case 3: the bad command is answered with its reason; a later approve and a
    reload still work, a restart does not replay it, and the escalation stays resolvable."""
    fake.decision = "escalate"
    ws = make_workspace(tmp_path, fake.port)
    gone, good = run_id(2, 1), run_id(2, 2)
    proc = ws.start()
    try:
        wait_ready(ws)
        drop(ws.results, "gone.json", result_document(2, gone))
        drop(ws.results, "good.json", result_document(2, good))
        wait_until(lambda: ws.ledger_states() == {"escalated": 2}, 15, what="two escalations")
        wait_until(lambda: serving(ws), 10, what="a fresh heartbeat")
        (ws.results / "gone.json").unlink()
        code, out, err = cli(capsys, ws, "approve", gone)
        assert (code, out) == (1, "")
        assert err == (
            f"refused: {gone}: still escalated:"
            " the result file was deleted since it was escalated\n"
            f"not kept as a labelled case: {gone}: its result file gone.json: no such file\n"
        )
        code, out, _ = cli(capsys, ws, "approve", good)
        assert (code, out.splitlines()[0]) == (
            0,
            f"approved: {good} -> started full_scoring_agent",
        )
        wait_until(ws.launches, 10, what="the approved launch")
        ws.edit_config(lambda c: c["policy"].update(confidence_threshold=0.2))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: ws.events("config.reloaded"), 10, what="config.reloaded")
    finally:
        assert stop(proc) == 0
    proc = ws.start()
    try:
        wait_until(lambda: len(ws.events("daemon.started")) == 2, 20, what="the restart")
        wait_until(lambda: serving(ws), 10, what="a fresh heartbeat")
        code, out, _ = cli(capsys, ws, "status")
        assert "pending escalations: 1" in out and f"  {gone}  step 2  gone.json: " in out
        code, out, _ = cli(capsys, ws, "reject", gone)
        assert (code, out) == (0, f"rejected: {gone} -> stops here\n")  # and no case: no file
    finally:
        assert stop(proc) == 0
    [refused] = ws.events("command.refused")
    assert refused["run_id"] == gone and refused["level"] == "warning"
    assert [e["run_id"] for e in ws.events("command.applied")] == [good, gone]
    assert len(ws.launches()) == 1 and ws.ledger_states() == {"acted": 1, "done": 1}
    assert not ws.events("task.crashed")


def test_approve_without_a_running_daemon_is_queued_and_applied_at_its_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    rid = run_id(2, 1)
    with escalated(tmp_path, fake, result_document(2, rid)) as (ws, _):
        pass
    code, out, _ = cli(capsys, ws, "approve", rid)
    assert (code, out) == (
        0,
        f"{rid}: approve queued; the daemon will apply it when it runs\n"
        f"{rid}: kept as a labelled case (right answer: proceed; 1 cases)\n",
    )
    proc = ws.start()
    try:
        wait_until(ws.launches, 20, what="the queued approval applied at start")
    finally:
        assert stop(proc) == 0
    assert [e["message"] for e in ws.events("command.applied")] == [
        f"approved: {rid} -> started full_scoring_agent"
    ]


def test_a_ledger_from_before_command_outcomes_gets_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE commands (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL,"
            " verb TEXT NOT NULL, created REAL NOT NULL, done REAL)"
        )
        db.execute("INSERT INTO commands (run_id, verb, created) VALUES ('r1', 'approve', 0)")
    db.close()
    ledger = Ledger(path)
    try:
        [(command_id, run, verb)] = ledger.pending_commands()
        assert ledger.command_outcome(command_id) is None
        ledger.finish_command(command_id, "refused", "no pending escalation")
        assert ledger.command_outcome(command_id) == ("refused", "no pending escalation")
        assert ledger.pending_commands() == []
    finally:
        ledger.close()


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real file system of `size` at `path`: a disk that can really be filled."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {mounted.stderr.decode()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill(path: Path) -> None:
    """Write `path` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_full_disk_keeps_the_status_loop_alive_and_status_tells_the_truth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    """Issue 12 case 5, on a real full file system under the state dir: the failing status
    file is logged once, `status` says "not responding" (not "not running") while it is
    stale, and the heartbeat comes back once there is room again."""
    ws = make_workspace(tmp_path, fake.port)
    with small_tmpfs(tmp_path / "state", "2m") as state, running(ws) as proc:
        wait_until(lambda: serving(ws), 10, what="a fresh heartbeat")
        fill(state / "filler")
        wait_until(lambda: ws.events("status.write_failed"), 10, what="status.write_failed")

        def status_line() -> str:
            return str(cli(capsys, ws, "status")[1].splitlines()[0])

        line = wait_until(
            lambda: (s := status_line()).startswith("daemon: not responding since") and s,
            status.STALE_SECONDS + 10, what="status to say the daemon is not responding",
        )  # fmt: skip
        assert f"(pid {proc.pid}, no heartbeat for " in line
        (state / "filler").unlink()
        wait_until(lambda: ws.events("status.write_recovered"), 10, what="the heartbeat back")
        code, out, _ = cli(capsys, ws, "status")
        assert code == 0 and out.startswith(f"daemon: running (pid {proc.pid})")
    [failed] = ws.events("status.write_failed")
    assert failed["level"] == "error" and "No space left on device" in failed["error"]
    assert not ws.events("task.crashed")


def test_approve_of_an_invalid_file_or_a_removed_agent_is_refused_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    """The other ways an escalation can go bad before it is approved (issue 12 case 3)."""
    fake.decision = "escalate"
    ws = make_workspace(tmp_path, fake.port)
    broken, orphan = run_id(2, 1), run_id(3, 2)
    proc = ws.start()
    try:
        wait_ready(ws)
        drop(ws.results, "broken.json", result_document(2, broken))
        drop(ws.results, "orphan.json", result_document(3, orphan))
        wait_until(lambda: ws.ledger_states() == {"escalated": 2}, 15, what="two escalations")
        wait_until(lambda: serving(ws), 10, what="a fresh heartbeat")
        (ws.results / "broken.json").write_text('{"agent_metadata": {}}')
        code, out, err = cli(capsys, ws, "approve", broken)
        assert (code, out) == (1, "")
        expected = f"refused: {broken}: still escalated: the result file cannot be used: "
        assert err.startswith(expected), err
        ws.edit_config(lambda c: c["agents"].pop("ml_meta_agent"))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: ws.events("config.reloaded"), 10, what="config.reloaded")
        code, out, err = cli(capsys, ws, "approve", orphan)
        # Refused as a command; still the operator's verdict on what the file shows.
        assert (code, out) == (1, f"{orphan}: kept as a labelled case (right answer: proceed;"
                                  " 1 cases)\n")  # fmt: skip
        assert err.startswith("refused: ") and "ml_meta_agent" in err
    finally:
        assert stop(proc) == 0
    assert not ws.launches(), "both escalations still pending"
    # The rewritten file is flagged as changed content; its escalation is left as it was.
    assert ws.ledger_states() == {"escalated": 2, "changed": 1}


def test_a_full_state_disk_is_one_line_from_the_cli_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by tests/test_chaos.py. SQLite's "database or disk is full" is the OSError
    (ENOSPC) of every other write on a full disk; the CLI says it in one line (`run` too, when
    it cannot start on a full disk: systemd starts it again)."""
    ws = make_workspace(tmp_path, free_port())
    rid = run_id(2, 1)
    with small_tmpfs(tmp_path / "state", "2m") as state:
        ledger = Ledger(state / "ledger.sqlite3")
        try:
            seen, _ = ledger.claim("r.json", "a" * 64, run_id=rid)
            ledger.update(ledger.update(seen, State.DECIDED, action="escalate"), State.ESCALATED)
            fill(state / "filler")
            with pytest.raises(OSError) as raised:
                ledger.claim("s.json", "b" * 64)
            assert raised.value.errno == errno.ENOSPC
        finally:
            ledger.close()
        code, out, err = cli(capsys, ws, "approve", rid)
    assert (code, out) == (1, "")
    full = f"[Errno 28] ledger: database or disk is full: '{state / 'ledger.sqlite3'}'"
    assert err == f"prng-llm-daemon approve: {full}\n"
