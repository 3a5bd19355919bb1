"""`prng-llm-daemon status / approve / reject` against a running daemon process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from prng_daemon.cli import main

from .fake_llama import FakeLlama
from .helpers import free_port, wait_until
from .workspace import (
    AGENT,
    Workspace,
    drop,
    make_workspace,
    result_document,
    run_id,
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


def test_status_with_an_unreadable_ledger_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = make_workspace(tmp_path, free_port())
    ledger = ws.root / "state" / "ledger.sqlite3"
    ledger.parent.mkdir()
    ledger.write_bytes(b"not a database, just bytes" * 100)
    code, out, err = cli(capsys, ws, "status")
    assert code == 1 and out == ""
    assert err.strip() == f"status: cannot read the ledger {ledger}: file is not a database"


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

        # The status file is rewritten within STATUS_POLL_SECONDS of a change, not at once.
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
        f"daemon: running (pid {proc.pid}) · orchestrator ready, math unmanaged · idle ·"
    )
    assert "2 decided, 0 escalated" in lines[0]
    assert lines[1].startswith("  orchestrator: ready (pid ")
    assert lines[2] == f"  math: not managed by the daemon, at {fake.url}"
    runs = lines.index("pipeline runs:")
    assert lines[runs + 1] == f"  {run_id(1, 1)}: step 2/6 acted (proceed -> full_scoring_agent)"
    decisions = lines[lines.index("last decisions:") + 1 :]
    assert [line.split()[2:5] for line in decisions] == [
        ["s2.json", "acted", "proceed"],
        ["s1.json", "acted", "proceed"],
    ]
    assert published["running"] is True and published["pid"] == proc.pid
    assert published["servers"]["orchestrator"]["pid"] > 0
    assert published["counts"] == {"acted": 2}
    assert [r["run_id"] for r in published["recent"]] == [run_id(2, 1), run_id(1, 1)]
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
    assert code == 0 and "queued" in out
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
        assert code == 0 and "queued" in out
        wait_until(lambda: ws.ledger_states() == {"done": 1}, 5, what="the rejection applied")
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
