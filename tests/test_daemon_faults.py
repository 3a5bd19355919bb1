"""Bad input, hung agents, lost events, no LLM: the daemon names the problem and keeps serving."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prng_daemon.ledger import Ledger

from .fake_llama import FakeLlama
from .helpers import wait_until
from .workspace import drop, make_workspace, result_document, run_id, running

GOOD = json.dumps(result_document(2, run_id(2, 1))).encode()


def _entries(ws_root: Path) -> dict[str, tuple[str, str | None]]:
    ledger = Ledger(ws_root / "state" / "ledger.sqlite3")
    try:
        return {e.path: (e.state.value, e.reason) for e in ledger.recent(1000)}
    finally:
        ledger.close()


def _bad_files(results: Path, outside: Path) -> dict[str, str]:
    """Write the corpus; return file name -> a phrase its quarantine reason must contain."""
    doc = json.loads(GOOD)

    def variant(**meta: object) -> bytes:
        d = json.loads(GOOD)
        d["agent_metadata"].update(meta)
        return json.dumps(d).encode()

    files = {
        "truncated.json": (GOOD[:50], "not valid JSON"),
        "wrong_type.json": (variant(confidence="high"), "is not of type 'number'"),
        "unknown_agent.json": (variant(follow_up_agent="evil_agent"), "is not one of"),
        "mismatch.json": (variant(follow_up_agent="prediction_agent"), "was expected"),
        "non_utf8.json": (b'{"agent_metadata": "\xff\xfe"}', "not UTF-8"),
        "nested.json": (b"[" * 3000 + b"]" * 3000, "nested deeper"),
        "huge.json": (b" " * (2 << 20), "over the"),
    }
    for name, (data, _) in files.items():
        tmp = results / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, results / name)
    (outside / "secret.json").write_bytes(json.dumps(doc).encode())
    (results / "escape.json").symlink_to(outside / "secret.json")
    reasons = {name: phrase for name, (_, phrase) in files.items()}
    reasons["escape.json"] = "symbolic link"
    return reasons


def test_bad_files_are_quarantined_and_good_ones_still_flow(
    tmp_path: Path, fake: FakeLlama
) -> None:
    ws = make_workspace(tmp_path / "ws", fake.port, daemon={"max_result_bytes": 1 << 20})
    outside = tmp_path / "outside"
    outside.mkdir()
    with running(ws) as proc:
        reasons = _bad_files(ws.results, outside)
        drop(ws.results, "good.json", result_document(2, run_id(2, 7)))
        wait_until(lambda: len(_entries(ws.root)) >= len(reasons) + 1, 30, what="all files")
        wait_until(lambda: ws.launches(), 10, what="the good file's agent")
        assert proc.poll() is None, "the daemon is still running"
    entries = _entries(ws.root)
    for name, phrase in reasons.items():
        state, reason = entries[name]
        assert state == "quarantined", name
        assert reason and phrase in reason, f"{name}: {reason}"
    assert entries["good.json"][0] == "acted"
    assert len(ws.launches()) == 1, "no agent for any bad file"
    rejected = [e for e in ws.events() if e["event"] == "result.rejected"]
    assert {e["file"] for e in rejected} == set(reasons)
    assert all(e["level"] == "error" for e in rejected)
    assert (outside / "secret.json").read_bytes() and (ws.results / "truncated.json").exists()


def test_agent_that_hangs_is_killed_at_its_timeout(tmp_path: Path, fake: FakeLlama) -> None:
    ws = make_workspace(tmp_path, fake.port)
    hang = tmp_path / "hang.py"
    hang.write_text("import time\ntime.sleep(600)\n")
    agent = {"argv": ["python3", str(hang)], "timeout_seconds": 1}
    ws.edit_config(lambda c: c["agents"].update(full_scoring_agent=agent))
    with running(ws):
        drop(ws.results, "r.json", result_document(2, run_id(2, 3)))
        wait_until(
            lambda: any(e["event"] == "agent.exited" for e in ws.events()), 30, what="the kill"
        )
    [timeout] = [e for e in ws.events() if e["event"] == "agent.timeout"]
    [exited] = [e for e in ws.events() if e["event"] == "agent.exited"]
    assert timeout["timeout_seconds"] == 1
    assert exited["exit_code"] == -15 and exited["level"] == "error"


def test_no_llm_with_wait_policy_leaves_the_file_waiting_then_decides_it(tmp_path: Path) -> None:
    with FakeLlama() as fake:
        fake.mode = "hang"
        ws = make_workspace(
            tmp_path, fake.port, policy={"when_no_llm": "wait"},
            routing={"request_timeout_seconds": 0.3},
        )  # fmt: skip
        with running(ws):
            drop(ws.results, "r.json", result_document(1, run_id(1, 4)))
            wait_until(lambda: _entries(ws.root).get("r.json", ("",))[0] == "waiting", 30)
            assert not ws.launches()
            fake.mode = "ok"
            wait_until(lambda: ws.launches(), 30, what="the decision once the LLM answers")
    assert _entries(ws.root)["r.json"][0] == "acted"


def test_changed_content_after_decision_is_flagged_not_rerun(
    tmp_path: Path, fake: FakeLlama
) -> None:
    ws = make_workspace(tmp_path, fake.port)
    with running(ws):
        drop(ws.results, "r.json", result_document(2, run_id(2, 5)))
        wait_until(lambda: ws.launches(), 20)
        drop(ws.results, "r.json", result_document(2, run_id(2, 5), confidence=0.5))
        wait_until(lambda: any(e["event"] == "result.changed" for e in ws.events()), 20)
    assert len(ws.launches()) == 1
    assert ws.ledger_states() == {"acted": 1, "changed": 1}


def test_decisions_dir_replaced_by_a_symlink_is_not_written_through(
    tmp_path: Path, fake: FakeLlama
) -> None:
    ws = make_workspace(tmp_path / "ws", fake.port)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with running(ws) as proc:
        decisions = ws.results / "decisions"
        decisions.rmdir()  # made (empty) by the daemon at start
        decisions.symlink_to(elsewhere, target_is_directory=True)
        drop(ws.results, "r.json", result_document(2, run_id(2, 6)))

        def refused() -> bool:
            text = (ws.root / "daemon.log").read_text()
            return f"{decisions} is a symbolic link or not a directory" in text

        wait_until(refused, 20, what="the refusal in the log")
        assert proc.poll() is None, "the daemon keeps serving"
    assert list(elsewhere.iterdir()) == []
    assert not ws.launches()
