"""The ledger's state machine, its corruption check and bounded record names, on real SQLite."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from prng_daemon.document.files import record_name, write_json_atomic
from prng_daemon.errors import LedgerCorrupt
from prng_daemon.handlers.record import FORMAT, read_records
from prng_daemon.ledger import Ledger, State, StateConflict


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.sqlite3")


def test_update_from_a_state_the_row_has_left_raises_instead_of_overwriting(
    ledger: Ledger,
) -> None:
    seen, _ = ledger.claim("r.json", "a" * 64, run_id="step1_20260101_000000_000001")
    decided = ledger.update(seen, State.DECIDED, action="proceed")
    with pytest.raises(
        StateConflict, match=r"\(r.json\) is decided, not seen: not moved to waiting"
    ):
        ledger.update(seen, State.WAITING, reason="a second writer with a stale row")
    assert ledger.get(seen.id).state is State.DECIDED and ledger.get(seen.id).reason is None
    launching = ledger.update(decided, State.LAUNCHING, agent="x")
    assert ledger.update(launching, State.ACTED, pid=7).state is State.ACTED
    ledger.close()


def test_moves_the_state_machine_does_not_allow_are_refused(ledger: Ledger) -> None:
    seen, _ = ledger.claim("r.json", "a" * 64)
    with pytest.raises(StateConflict, match="no move from seen to acted"):
        ledger.update(seen, State.ACTED)
    failed = ledger.update(seen, State.FAILED, reason="stuck")
    for state in (State.SEEN, State.DECIDED, State.LAUNCHING, State.ACTED):
        with pytest.raises(StateConflict, match=f"no move from failed to {state}"):
            ledger.update(failed, state)
    assert ledger.update(failed, State.FAILED, exit_code=1).exit_code == 1, "fields may change"
    ledger.close()


def _corrupt_copies(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.sqlite3"
    ledger = Ledger(good)
    for n in range(2000):
        ledger.claim(f"r{n}.json", f"{n:064x}", run_id=f"step1_20260101_000000_{n:06x}")
    ledger.close()
    data = good.read_bytes()
    copies = {
        "garbage": b"not a database, just bytes" * 100,
        "truncated": data[: len(data) // 2],
        "zeroed page": data[:8192] + bytes(4096) + data[12288:],
    }
    paths = {}
    for name, content in copies.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.sqlite3"
        paths[name].write_bytes(content)
    return paths


def test_a_corrupt_or_truncated_ledger_is_named_in_one_line_with_what_to_do(
    tmp_path: Path,
) -> None:
    for name, path in _corrupt_copies(tmp_path).items():
        for readonly in (False, True):
            with pytest.raises(LedgerCorrupt) as caught:
                Ledger(path, readonly=readonly)
            message = str(caught.value)
            assert "\n" not in message, name
            assert message.startswith(f"ledger {path} is corrupt (sqlite: "), name
            assert message.endswith(
                "): move it aside and restart; the daemon rebuilds it from the results dir"
            ), name


def test_a_rebuild_is_one_transaction_and_skips_what_is_there(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    assert ledger.is_empty()
    fields = {"run_id": "step1_20260101_000000_000001", "action": "proceed"}

    def rows() -> Iterator[tuple[str, str, State, dict[str, object]]]:
        yield "a.json", "aa", State.ACTED, fields
        raise OSError("the disk went away mid-rebuild")

    with pytest.raises(OSError):
        ledger.restore(rows())
    assert ledger.is_empty(), "nothing half-restored: the next start rebuilds again"
    assert ledger.restore([("a.json", "aa", State.ACTED, fields)]) == 1
    assert ledger.restore([("a.json", "aa", State.DONE, {}), ("b.json", "bb", State.DONE, {})]) == 1
    assert ledger.known_paths() == {"a.json", "b.json"} and not ledger.is_empty()
    assert ledger.counts() == {"acted": 1, "done": 1}
    ledger.close()


def test_record_names_of_long_file_names_stay_writable_and_distinct(tmp_path: Path) -> None:
    """NAME_MAX is 255 bytes: the record and its temp file must fit for any result name."""
    sha = "ab" * 32
    names = [
        "s" * 250 + ".json",
        "s" * 249 + "t.json",
        "é" * 125 + ".json",  # 250 bytes of two-byte characters: cut on a character boundary
        "short.json",
    ]
    records = [record_name(Path(n), sha, "decision") for n in names]
    assert records[-1] == "short.abababab.decision.json"
    assert len(set(records)) == len(records), "a hash of the whole stem keeps them apart"
    for record in records:
        assert len(os.fsencode(record)) <= 200
        write_json_atomic(tmp_path / record, {"ok": True})
        write_json_atomic(tmp_path / record_name(Path(record), sha, "params"), {})
    assert records[2].encode().decode("utf-8") == records[2]


def test_a_ledger_from_before_the_sweep_gains_its_attempts_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE files (id INTEGER PRIMARY KEY, path TEXT NOT NULL, sha256 TEXT NOT NULL,"
        " state TEXT NOT NULL, run_id TEXT, parent_run_id TEXT, root_run_id TEXT, step INTEGER,"
        " reason TEXT, decision TEXT, action TEXT, agent TEXT, pid INTEGER, exit_code INTEGER,"
        " ended REAL, created REAL NOT NULL, updated REAL NOT NULL, UNIQUE (path, sha256));"
        "INSERT INTO files (path, sha256, state, created, updated)"
        " VALUES ('r.json', 'aa', 'decided', 0, 0);"
    )
    old.close()
    ledger = Ledger(path)
    assert not ledger.is_empty()
    [entry] = ledger.stuck(older_than=1.0)
    assert entry.attempts == 0
    assert ledger.update(entry, entry.state, attempts=1).attempts == 1
    ledger.close()


def test_decisions_written_under_the_old_field_name_are_read_as_they_are(tmp_path: Path) -> None:
    """Ledger rows and decision records from before `decided_by` (`path`, `policy_path`) still
    give typed decisions: an upgrade neither strands a decided row nor loses a rebuild."""
    old = {"action": "retry", "confidence": 0.5, "calibrated_confidence": None, "reasoning": "r",
           "suggested_params": {}, "path": "rules", "llm_metadata": {}}  # fmt: skip
    ledger = Ledger(tmp_path / "l.sqlite3")
    entry, _ = ledger.claim("a.json", "aa")
    ledger.close()
    db = sqlite3.connect(tmp_path / "l.sqlite3")
    with db:
        db.execute("UPDATE files SET decision = ? WHERE id = ?", (json.dumps(old), entry.id))
    db.close()
    ledger = Ledger(tmp_path / "l.sqlite3")
    decision = ledger.get(entry.id).decision
    assert decision is not None and decision.decided_by == "rules"
    ledger.close()

    record = {"record": FORMAT, "result_file": str(tmp_path / "b.json"), "sha256": "bb",
              "run_id": None, "parent_run_id": None, "pipeline_run": None, "pipeline_step": 2,
              "decision": "escalate", "policy_path": "guardrail", "confidence": 0.9,
              "calibrated_confidence": None, "reasoning": "r", "suggested_params": {},
              "llm_metadata": {}, "agent": None, "pid": None, "outcome": "escalated"}  # fmt: skip
    decisions = tmp_path / "decisions"
    write_json_atomic(decisions / "b.decision.json", record)
    [(name, sha, state, fields)] = read_records(decisions)
    assert (name, sha, state) == ("b.json", "bb", State.ESCALATED)
    assert fields["decision"].decided_by == "guardrail"
