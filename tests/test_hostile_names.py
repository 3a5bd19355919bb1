"""File names are input too: not UTF-8, or full of newlines and terminal escapes."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from prng_daemon.cli import main
from prng_daemon.document.names import utf8_name
from prng_daemon.ledger import Ledger
from prng_daemon.watcher import Watcher

from .fake_llama import FakeLlama
from .helpers import wait_until
from .workspace import drop, make_workspace, result_document, run_id, running

GOOD = json.dumps(result_document(2, run_id(2, 1))).encode()
HOSTILE = "evil\n\x1b[31mred\u202e.json"
"""A newline, an ANSI colour and a right-to-left override: all three change what a terminal
shows if printed raw."""
HOSTILE_SHOWN = "evil\\n\\x1b[31mred\\u202e.json"


def _entries(root: Path) -> dict[str, tuple[str, str | None]]:
    ledger = Ledger(root / "state" / "ledger.sqlite3")
    try:
        return {e.path: (e.state.value, e.reason) for e in ledger.recent(1000)}
    finally:
        ledger.close()


def test_a_name_that_is_not_utf8_is_quarantined_once_and_rescans_go_on(
    tmp_path: Path, fake: FakeLlama
) -> None:
    ws = make_workspace(tmp_path / "ws", fake.port)
    outside = tmp_path / "outside.json"
    outside.write_bytes(json.dumps(result_document(2, run_id(2, 2))).encode())
    with running(ws) as proc:
        with open(os.fsencode(ws.results) + b"/step2_\xff\xfe.json", "wb") as f:
            f.write(GOOD)
        shown = "step2_\\xff\\xfe.json"
        wait_until(lambda: shown in _entries(ws.root), 20, what="the bad name quarantined")
        # A hard link raises no event the watcher takes: only a later rescan finds this file.
        os.link(outside, ws.results / "linked.json")
        wait_until(lambda: ws.launches(), 20, what="a rescan to find linked.json")
        assert proc.poll() is None
    state, reason = _entries(ws.root)[shown]
    assert state == "quarantined" and reason == "the file name is not valid UTF-8; rename the file"
    rejected = [e for e in ws.events() if e["event"] == "result.rejected"]
    assert [e["file"] for e in rejected] == [shown], "logged once, with the name escaped"
    assert [e["event"] for e in ws.events() if e["level"] == "error"] == ["result.rejected"]
    assert "Traceback" not in (ws.root / "daemon.log").read_text()


def test_a_rescan_skips_a_name_the_ledger_holds_in_its_escaped_form(tmp_path: Path) -> None:
    with open(os.fsencode(tmp_path) + b"/step2_\xff.json", "wb") as f:
        f.write(GOOD)
    loop = asyncio.new_event_loop()
    try:
        with Watcher(tmp_path, loop, lambda path, source: None, lambda: None) as watcher:
            assert [p.name for p in watcher.scan()] == ["step2_\udcff.json"]
            assert watcher.scan({utf8_name("step2_\udcff.json")}) == []
    finally:
        loop.close()


def test_status_escapes_control_characters_in_file_names(
    tmp_path: Path, fake: FakeLlama, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = make_workspace(tmp_path, fake.port)
    with running(ws):
        drop(ws.results, HOSTILE, {"not": "a result"})
        wait_until(lambda: HOSTILE in _entries(ws.root), 20, what="the file quarantined")
        assert main(["status", "--config", str(ws.config_path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    [line] = [line for line in out.splitlines() if "evil" in line]
    assert line.endswith(
        f"  {HOSTILE_SHOWN}  quarantined  ('agent_metadata' is a required property)"
    )


def test_validate_escapes_the_file_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / HOSTILE
    path.write_bytes(b"[")
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert out.splitlines()[0] == f"{tmp_path}/{HOSTILE_SHOWN}: INVALID"
