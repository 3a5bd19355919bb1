"""The ledger's promises through the running daemon (issue 12, cases 1, 2, 5, 9, 10, 12, 14):
a lost ledger is rebuilt without a second launch, a failed exec is a failed launch, nothing stays
mid-way unseen, and what cannot be acted on is escalated with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prng_daemon.ledger import Ledger

from .fake_llama import FakeLlama
from .helpers import wait_until
from .test_status_cli import cli
from .workspace import Workspace, drop, make_workspace, result_document, run_id, running


def _rows(ws: Workspace) -> dict[str, tuple[str, str | None]]:
    ledger = Ledger(ws.root / "state" / "ledger.sqlite3")
    try:
        return {e.path: (e.state.value, e.reason) for e in ledger.recent(1000)}
    finally:
        ledger.close()


def _delete_ledger(ws: Workspace) -> None:
    for path in (ws.root / "state").glob("ledger.sqlite3*"):
        path.unlink()


def _markers(ws: Workspace) -> list[Path]:
    return list((ws.root / "state" / "launches").iterdir())


def test_old_launch_markers_do_not_block_new_files_after_the_ledger_is_deleted(
    tmp_path: Path, fake: FakeLlama
) -> None:
    """Case 1: the new ledger's first file used to meet the old first file's marker."""
    ws = make_workspace(tmp_path, fake.port)
    with running(ws):
        drop(ws.results, "a.json", result_document(2, run_id(2, 1)))
        wait_until(lambda: ws.finished(1) and ws.launches(), 20, what="the first launch")
    (ws.results / "a.json").unlink()
    _delete_ledger(ws)
    with running(ws):
        drop(ws.results, "b.json", result_document(3, run_id(3, 2)))
        wait_until(lambda: len(ws.launches()) == 2, 20, what="the new file's agent")
    assert _rows(ws)["b.json"] == ("acted", None)
    assert len(_markers(ws)) == 2


def test_a_deleted_ledger_is_rebuilt_from_the_decision_records_and_nothing_runs_twice(
    tmp_path: Path, fake: FakeLlama
) -> None:
    """Acted, finished and escalated files keep their outcome; only new files are decided."""
    ws = make_workspace(tmp_path, fake.port)
    with running(ws):
        drop(ws.results, "a.json", result_document(2, run_id(2, 1)))
        drop(ws.results, "z.json", result_document(6, run_id(6, 1)))
        wait_until(lambda: ws.finished(2) and ws.launches(), 20)
        fake.decision = "escalate"
        drop(ws.results, "e.json", result_document(3, run_id(3, 1)))
        wait_until(lambda: ws.finished(3), 20, what="the escalation")
    before = _rows(ws)
    assert {name: state for name, (state, _) in before.items()} == {
        "a.json": "acted", "z.json": "done", "e.json": "escalated"
    }  # fmt: skip
    _delete_ledger(ws)
    fake.decision = "proceed"  # were e.json decided again, it would now launch
    with running(ws):
        wait_until(lambda: ws.events("ledger.restored"), 20, what="the rebuild")
        drop(ws.results, "n.json", result_document(4, run_id(4, 1)))
        wait_until(lambda: len(ws.launches()) == 2, 20, what="the new file's agent")
        assert _rows(ws)["e.json"] == before["e.json"], "still escalated, same reason"
    [restored] = ws.events("ledger.restored")
    assert restored["rows"] == 3
    assert len(ws.events("decision.made")) == 4, "three before, only n.json after"
    after = _rows(ws)
    assert after["a.json"] == ("acted", "restored from its decision record")
    assert after["z.json"] == before["z.json"] == ("done", "pipeline run complete")
    assert after["n.json"] == ("acted", None)
    assert len(_markers(ws)) == 2 and len(ws.launches()) == 2


def test_a_restored_escalation_can_still_be_approved(
    tmp_path: Path, fake: FakeLlama, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.decision = "escalate"
    ws = make_workspace(tmp_path, fake.port)
    with running(ws):
        drop(ws.results, "e.json", result_document(3, run_id(3, 1)))
        wait_until(lambda: ws.finished(1), 20, what="the escalation")
    _delete_ledger(ws)
    with running(ws):
        wait_until(lambda: ws.events("ledger.restored"), 20, what="the rebuild")
        code, out, _ = cli(capsys, ws, "approve", run_id(3, 1))
        assert code == 0, out
        wait_until(ws.launches, 10, what="the approved follow-up")
    assert _rows(ws)["e.json"] == ("acted", None)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (
            b"#!/nonexistent/interpreter\nexit 0\n",
            "cannot start {program}: its #! interpreter /nonexistent/interpreter does not exist",
        ),
        (bytes(range(256)) * 4, "Exec format error (ENOEXEC)"),
    ],
    ids=["bad-shebang", "garbage-binary"],
)
def test_an_agent_that_cannot_be_executed_is_a_failed_launch(
    tmp_path: Path, fake: FakeLlama, capsys: pytest.CaptureFixture[str], content: bytes, error: str
) -> None:
    """Case 2: glibc's posix_spawn reports the failed exec after the marker was made."""
    ws = make_workspace(tmp_path, fake.port)
    program = tmp_path / "broken-agent"
    program.write_bytes(content)
    program.chmod(0o755)
    ws.edit_config(lambda c: c["agents"]["full_scoring_agent"].update(argv=[str(program)]))
    with running(ws):
        drop(ws.results, "r.json", result_document(2, run_id(2, 3)))
        wait_until(lambda: ws.finished(1), 20, what="the launch to be settled")
    state, reason = _rows(ws)["r.json"]
    assert state == "failed" and reason and reason.endswith(error.format(program=program)), reason
    [failed] = ws.events("agent.failed")
    assert failed["level"] == "error" and failed["reason"] == reason
    assert not _markers(ws), "no marker claims a launch that never ran"
    [record] = (ws.results / "decisions").glob("r.*.decision.json")
    assert json.loads(record.read_text())["outcome"] == "failed"
    _, out, _ = cli(capsys, ws, "status")
    assert f"stuck or failed: 1\n  {run_id(2, 3)}  step 2  r.json: failed: {reason}\n" in out


def test_a_retry_whose_own_agent_is_not_configured_is_escalated_with_the_reason(
    tmp_path: Path, fake: FakeLlama, capsys: pytest.CaptureFixture[str]
) -> None:
    """Case 9: the decision was retry; the step's own agent is not in the config."""
    fake.decision = "retry"
    ws = make_workspace(tmp_path, fake.port)
    ws.edit_config(lambda c: c["agents"].pop("scorer_meta_agent"))
    rid = run_id(2, 4)
    with running(ws):
        # A failure with retries left: the one case where the policy can say retry.
        drop(ws.results, "r.json", result_document(2, rid, success_criteria_met=False))
        wait_until(lambda: ws.ledger_states() == {"escalated": 1}, 20, what="an escalation")
        _, out, _ = cli(capsys, ws, "status")
        assert f"  {rid}  step 2  r.json: retry: agent scorer_meta_agent is not configured" in out
        code, _, _ = cli(capsys, ws, "approve", rid)  # proceed instead: its agent is there
        assert code == 0
        wait_until(ws.launches, 10, what="the follow-up after the approval")
    assert ws.ledger_states() == {"acted": 1}


def test_a_result_with_a_very_long_name_is_acted_on(tmp_path: Path, fake: FakeLlama) -> None:
    """Case 10: 245-byte names used to overflow the params file's temp name."""
    ws = make_workspace(tmp_path, fake.port)
    names = [f"step2_{c * 234}.json" for c in "ab"]
    with running(ws):
        for n, name in enumerate(names):
            drop(ws.results, name, result_document(2, run_id(2, 10 + n)))
        wait_until(lambda: len(ws.launches()) == 2, 20, what="both agents")
        wait_until(lambda: ws.finished(2), 10)
    assert ws.ledger_states() == {"acted": 2}
    records = list((ws.results / "decisions").glob("*.decision.json"))
    assert {json.loads(r.read_text())["result_file"] for r in records} == {
        str(ws.results / name) for name in names
    }


def test_approve_of_a_run_id_resolves_every_file_escalated_under_it(
    tmp_path: Path, fake: FakeLlama, capsys: pytest.CaptureFixture[str]
) -> None:
    """Case 12: the same content under five names is five escalations of one run id."""
    fake.decision = "escalate"
    ws = make_workspace(tmp_path, fake.port)
    rid = run_id(2, 5)
    names = [f"copy{n}.json" for n in range(5)]
    with running(ws):
        for name in names:
            drop(ws.results, name, result_document(2, rid))
        wait_until(lambda: ws.ledger_states() == {"escalated": 5}, 20, what="five escalations")
        code, _, _ = cli(capsys, ws, "reject", rid)
        assert code == 0
        wait_until(lambda: ws.ledger_states() == {"done": 5}, 10, what="all five rejected")
    [done] = ws.events("command.applied")
    assert done["message"] == f"rejected: {rid} -> " + "; ".join(f"{n}: stops here" for n in names)
    assert not ws.launches()


def _corrupt(ws: Workspace, how: str) -> Path:
    path = ws.root / "state" / "ledger.sqlite3"
    path.parent.mkdir(exist_ok=True)
    if how == "garbage":
        path.write_bytes(b"\x00garbage\xff" * 1000)
        return path
    ledger = Ledger(path)
    for n in range(2000):
        ledger.claim(f"r{n}.json", f"{n:064x}", run_id=run_id(1, n))
    ledger.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_a_corrupt_ledger_gives_one_line_and_exit_2_from_run_status_and_approve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama, how: str
) -> None:
    """Case 14: no traceback; the line says what to do."""
    ws = make_workspace(tmp_path, fake.port)
    path = _corrupt(ws, how)
    expected = f"ledger {path} is corrupt (sqlite: "
    tail = "): move it aside and restart; the daemon rebuilds it from the results dir"
    daemon = subprocess.run(
        [sys.executable, "-m", "prng_daemon", "run", "--config", str(ws.config_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = [daemon.stderr.strip()]
    assert daemon.returncode == 2
    for verb in (["status"], ["approve", run_id(2, 1)]):
        code, out, err = cli(capsys, ws, *verb)
        assert code == 2 and not out
        lines.append(err.strip())
    for line in lines:
        assert "\n" not in line and line.startswith(expected) and line.endswith(tail), line


def test_an_escalation_whose_record_cannot_be_written_is_settled_at_once_with_the_reason(
    tmp_path: Path, fake: FakeLlama, capsys: pytest.CaptureFixture[str]
) -> None:
    """Case 5, as issue 24 item 6 sorts it: a file where decisions/ should be will not go away
    by itself, so the escalation is settled at once (not left in `decided` for the sweep),
    pending in `status` with the reason, and written nowhere else."""
    fake.decision = "escalate"
    ws = make_workspace(tmp_path, fake.port, daemon={"transient_deadline_seconds": 3600})
    decisions = ws.results / "decisions"
    with running(ws):
        decisions.rmdir()
        decisions.write_text("in the way")
        drop(ws.results, "r.json", result_document(2, run_id(2, 6)))
        wait_until(lambda: ws.ledger_states() == {"escalated": 1}, 20, what="the escalation")
        code, out, _ = cli(capsys, ws, "status", "--json")
        [row] = json.loads(out)["escalations"]
    unsafe = f"{decisions} is a symbolic link or not a directory; nothing is written through it"
    assert row["file"] == "r.json" and row["reason"].endswith(f"; no decision record: {unsafe}")
    [refused] = ws.events("record.refused")
    assert refused["level"] == "error" and refused["reason"] == unsafe
    assert decisions.read_text() == "in the way"
