"""Bad input, hung agents, lost events, no LLM: the daemon names the problem and keeps serving."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from prng_daemon.ledger import Ledger

from .fake_llama import FakeLlama
from .helpers import wait_until
from .test_status_cli import fill, small_tmpfs
from .workspace import drop, make_workspace, result_document, run_id, running, stop, wait_ready

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
        # It will not clear by itself: the row is settled at once, with the reason (issue 24.6).
        wait_until(lambda: ws.ledger_states() == {"failed": 1}, 10, what="the row settled")
        assert proc.poll() is None, "the daemon keeps serving"
    assert list(elsewhere.iterdir()) == []
    assert not ws.launches()
    reason = f"{decisions} is a symbolic link or not a directory; nothing is written through it"
    assert _entries(ws.root)["r.json"] == ("failed", reason)
    [failed] = [e for e in ws.events() if e["level"] == "error"]
    assert failed["event"] == "agent.failed" and failed["reason"] == reason


def test_a_loop_that_keeps_crashing_is_restarted_then_the_daemon_exits_non_zero(
    tmp_path: Path, fake: FakeLlama
) -> None:
    """A dropped `commands` table makes every poll of the command loop raise: each crash is
    logged with its traceback and restarted with backoff; past the budget the daemon exits 1,
    for systemd to restart it, instead of running on without that part."""
    ws = make_workspace(tmp_path, fake.port)
    proc = ws.start()
    try:
        wait_ready(ws)
        with contextlib.closing(sqlite3.connect(ws.root / "state" / "ledger.sqlite3")) as db:
            db.execute("DROP TABLE commands")
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            stop(proc)
    assert code == 1
    crashed = ws.events("task.crashed")
    assert {e["task"] for e in crashed} == {"commands"}
    assert len(crashed) == 6, "the first run and five restarts"
    assert "no such table: commands" in crashed[0]["error"] and crashed[0]["level"] == "error"
    assert "Traceback" in crashed[0]["exception"]
    assert len(ws.events("task.restarting")) == 5
    [failed] = ws.events("daemon.failed")
    assert failed["reason"] == "task commands crashed 6 times; giving up"
    assert ws.events()[-1]["event"] == "daemon.stopped"


def test_results_dir_deleted_and_made_again_is_watched_again(
    tmp_path: Path, fake: FakeLlama
) -> None:
    """Issue 12 case 4. The next rescan is an hour away: only a re-armed inotify watch can see
    the file dropped into the new directory."""
    ws = make_workspace(tmp_path, fake.port, daemon={"rescan_interval_seconds": 3600})
    with running(ws) as proc:
        drop(ws.results, "before.json", result_document(2, run_id(2, 41)))
        wait_until(ws.launches, 20, what="the first launch")
        shutil.rmtree(ws.results)
        wait_until(lambda: ws.events("watcher.dir_missing"), 10, what="watcher.dir_missing")
        ws.results.mkdir()
        wait_until(lambda: ws.events("watcher.dir_back"), 10, what="watcher.dir_back")
        drop(ws.results, "after.json", result_document(2, run_id(2, 42)))
        wait_until(lambda: len(ws.launches()) == 2, 20, what="the launch for the new file")
        assert proc.poll() is None
    [missing] = ws.events("watcher.dir_missing")
    assert missing["level"] == "error" and missing["directory"] == str(ws.results)
    assert ws.events("watcher.rearmed")
    sources = {e["file"]: e["source"] for e in ws.events("result.validated")}
    assert sources == {"before.json": "moved", "after.json": "moved"}
    assert not ws.events("task.crashed")


def _without(limit: str) -> list[str]:
    """A prefix that runs the rest in a user namespace of its own whose inotify `limit`
    (max_inotify_instances or max_inotify_watches) is 0: the daemon gets the kernel's own
    EMFILE or ENOSPC, and nothing outside that namespace is affected."""
    return [
        "unshare", "--user", "--map-root-user", "sh", "-c",
        f'echo 0 > /proc/sys/user/{limit} && exec "$@"', "sh",
    ]  # fmt: skip


def _set_limit(pid: int, limit: str, value: int) -> None:
    """Set inotify `limit` in the user namespace that process `pid` runs in."""
    subprocess.run(
        ["nsenter", "--user", "--target", str(pid), "sh", "-c",
         f"echo {value} > /proc/sys/user/{limit}"],
        check=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("limit", "error"),
    [
        ("max_inotify_instances", "[Errno 24] inotify instance limit reached"),
        ("max_inotify_watches", "[Errno 28] inotify watch limit reached"),
    ],
)
def test_inotify_limits_fall_back_to_scanning_then_recover(
    tmp_path: Path, fake: FakeLlama, limit: str, error: str
) -> None:
    """Issue 12 case 14: no inotify instance (or watch) left at start gives a warning and a
    scan every 2 s instead of a traceback (the configured rescan is an hour away), and inotify
    again once the limit allows."""
    probe = subprocess.run([*_without(limit), "true"], capture_output=True)
    if probe.returncode != 0 or not shutil.which("nsenter"):
        pytest.skip(f"needs unshare --user and nsenter: {probe.stderr.decode().strip()}")
    ws = make_workspace(tmp_path, fake.port, daemon={"rescan_interval_seconds": 3600})
    proc = ws.start(prefix=_without(limit))
    try:
        wait_ready(ws)
        drop(ws.results, "scanned.json", result_document(2, run_id(2, 51)))
        wait_until(ws.launches, 20, what="a launch found by scanning")
        _set_limit(proc.pid, limit, 1024)
        wait_until(lambda: ws.events("watcher.recovered"), 10, what="watcher.recovered")
        drop(ws.results, "watched.json", result_document(2, run_id(2, 52)))
        wait_until(lambda: len(ws.launches()) == 2, 20, what="the second launch")
    finally:
        assert stop(proc) == 0
    [degraded] = ws.events("watcher.degraded")
    assert degraded["level"] == "warning" and degraded["error"] == error
    sources = {e["file"]: e["source"] for e in ws.events("result.validated")}
    assert sources["scanned.json"] == "scan"
    assert not [e for e in ws.events() if e["level"] == "error"]


def test_a_waiting_file_deleted_is_failed_and_a_decided_one_rewritten_invalid_is_changed(
    tmp_path: Path, fake: FakeLlama
) -> None:
    """Both found by tests/test_chaos.py. A file waiting for an LLM, then deleted, is failed
    with the reason at its next retry (it was retried, and crashed a worker, forever); a
    decided file rewritten invalid is flagged `changed` like a valid rewrite (it crashed its
    worker on the move from changed to quarantined)."""
    fake.mode = "hang"
    ws = make_workspace(
        tmp_path, fake.port, policy={"when_no_llm": "wait"},
        routing={"request_timeout_seconds": 0.3},
    )  # fmt: skip
    with running(ws):
        drop(ws.results, "w.json", result_document(1, run_id(1, 61)))
        wait_until(lambda: ws.ledger_states() == {"waiting": 1}, 30, what="waiting")
        (ws.results / "w.json").unlink()
        wait_until(lambda: ws.ledger_states() == {"failed": 1}, 30, what="the row failed")
        fake.mode = "ok"
        drop(ws.results, "d.json", result_document(2, run_id(2, 62)))
        wait_until(ws.launches, 20, what="the launch")
        (ws.results / "d.json").write_text('{"agent_metadata": {}}')
        wait_until(lambda: ws.events("result.changed"), 20, what="result.changed")
    assert _entries(ws.root)["w.json"] == ("failed", "the file was deleted while waiting")
    assert ws.ledger_states() == {"failed": 1, "acted": 1, "changed": 1}
    [changed] = ws.events("result.changed")
    assert changed["file"] == "d.json" and "not valid JSON" not in changed["reason"]
    assert "content changed after it was decided" in changed["reason"]
    assert not ws.events("result.crashed") and not ws.events("result.rejected")
    assert len(ws.launches()) == 1


def test_an_agent_ending_on_a_full_disk_is_logged_not_lost_in_its_task(
    tmp_path: Path, fake: FakeLlama
) -> None:
    """Found by tests/test_chaos.py: recording an agent's end on a full disk raised in the
    launcher's watch task, and only asyncio's "Task exception was never retrieved" said so."""
    ws = make_workspace(tmp_path, fake.port)
    go = tmp_path / "go"
    os.mkfifo(go)
    waiter = tmp_path / "waiter.py"
    waiter.write_text("import sys\nopen(sys.argv[1]).read()\n")  # ends when `go` is written
    agent = {"argv": [sys.executable, str(waiter), str(go)]}
    ws.edit_config(lambda c: c["agents"].update(full_scoring_agent=agent))
    with small_tmpfs(tmp_path / "state", "16m") as state, running(ws):
        drop(ws.results, "r.json", result_document(2, run_id(2, 71)))
        wait_until(lambda: ws.events("agent.started"), 20, what="the agent started")
        fill(state / "filler")
        with open(go, "w"):
            pass
        wait_until(lambda: ws.events("agent.exited"), 10, what="agent.exited")
        (state / "filler").unlink()
    [unrecorded] = ws.events("agent.exit_unrecorded")
    assert unrecorded["level"] == "error" and "disk is full" in unrecorded["error"]
    assert ws.events("agent.exited")[0]["exit_code"] == 0
    lines = (ws.root / "daemon.log").read_text().splitlines()
    assert all(line.startswith("{") for line in lines), "nothing outside the JSON log"
