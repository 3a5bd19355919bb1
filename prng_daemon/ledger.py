"""The SQLite ledger: every result file by path and content hash, its state and its decision.

It is what makes the daemon exactly-once across restarts and crashes: a (path, sha256) pair is
decided once, and a launch is recorded as an intent before it happens.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = ["Entry", "Ledger", "State"]


class State(StrEnum):
    SEEN = "seen"
    DECIDED = "decided"
    LAUNCHING = "launching"
    """The launch intent is recorded; the agent may or may not have started."""
    ACTED = "acted"
    ESCALATED = "escalated"
    DONE = "done"
    """Nothing more to do: the pipeline run completed, an escalation was rejected."""
    WAITING = "waiting"
    """No LLM could answer and policy says wait; tried again later."""
    QUARANTINED = "quarantined"
    FAILED = "failed"
    CHANGED = "changed"
    """The file's content changed after an earlier version was decided: flagged, not re-run."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    state TEXT NOT NULL,
    run_id TEXT,
    parent_run_id TEXT,
    root_run_id TEXT,
    step INTEGER,
    reason TEXT,
    decision TEXT,
    action TEXT,
    agent TEXT,
    pid INTEGER,
    exit_code INTEGER,
    ended REAL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (path, sha256)
);
CREATE INDEX IF NOT EXISTS files_state ON files (state);
CREATE INDEX IF NOT EXISTS files_run ON files (run_id);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    verb TEXT NOT NULL,
    created REAL NOT NULL,
    done REAL,
    outcome TEXT,
    message TEXT
);
"""

_COMMAND_COLUMNS = {"outcome": "TEXT", "message": "TEXT"}
"""Added after the first release: a ledger made before them gets them at open."""


@dataclass(frozen=True)
class Entry:
    id: int
    path: str
    sha256: str
    state: State
    run_id: str | None
    parent_run_id: str | None
    root_run_id: str | None
    step: int | None
    reason: str | None
    decision: dict[str, Any] | None
    action: str | None
    agent: str | None
    pid: int | None
    exit_code: int | None
    ended: float | None
    """When the agent was seen to end (its exit code may still be unknown)."""
    created: float
    updated: float


def _entry(row: sqlite3.Row) -> Entry:
    values = dict(row)
    values["state"] = State(values["state"])
    values["decision"] = json.loads(values["decision"]) if values["decision"] else None
    return Entry(**values)


class Ledger:
    """One connection, used from the event loop's thread only (the CLI opens its own)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        """`readonly`: for `status`, which any user in the service's group may run."""
        self._paths: set[str] | None = None
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
            self._db.row_factory = sqlite3.Row
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            path, isolation_level=None, timeout=30.0, check_same_thread=False
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; only power loss can lose the last.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(commands)")}
        for column, kind in _COMMAND_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE commands ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def get(self, entry_id: int) -> Entry:
        row = self._db.execute("SELECT * FROM files WHERE id = ?", (entry_id,)).fetchone()
        return _entry(row)

    def claim(self, path: str, sha256: str, **fields: Any) -> tuple[Entry, bool]:
        """The entry for this exact content; True when it is new (never seen before).

        A new entry is recorded with `fields` (run_id, step, ...). When an earlier version of
        the same path was already decided, the new content is recorded as CHANGED and is not
        processed.
        """
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM files WHERE path = ? AND sha256 = ?", (path, sha256)
            ).fetchone()
            if row:
                return _entry(row), False
            earlier = db.execute(
                "SELECT run_id FROM files WHERE path = ? AND state NOT IN (?, ?) LIMIT 1",
                (path, State.SEEN, State.QUARANTINED),
            ).fetchone()
            state = State.CHANGED if earlier else State.SEEN
            reason = "content changed after it was decided; not re-run" if earlier else None
            columns = "".join(f", {name}" for name in fields)
            marks = ", ?" * len(fields)
            cur = db.execute(
                f"INSERT INTO files (path, sha256, state, reason, created, updated{columns})"
                f" VALUES (?, ?, ?, ?, ?, ?{marks})",
                (path, sha256, state, reason, now, now, *fields.values()),
            )
            entry_id = cur.lastrowid
            assert entry_id is not None
        if self._paths is not None:
            self._paths.add(path)
        return self.get(entry_id), True

    def update(self, entry_id: int, state: State, **fields: Any) -> Entry:
        if "decision" in fields and fields["decision"] is not None:
            fields["decision"] = json.dumps(fields["decision"])
        columns = "".join(f", {name} = ?" for name in fields)
        sql = f"UPDATE files SET state = ?, updated = ?{columns} WHERE id = ?"
        self._db.execute(sql, (state, time.time(), *fields.values(), entry_id))
        return self.get(entry_id)

    def known_paths(self) -> set[str]:
        """Every file name the ledger has a record of: what a catch-up scan skips.

        Read once, then kept current by claim(): the daemon is the ledger's only writer.
        """
        if self._paths is None:
            self._paths = {row[0] for row in self._db.execute("SELECT DISTINCT path FROM files")}
        return self._paths

    def in_state(self, *states: State) -> list[Entry]:
        marks = ", ".join("?" for _ in states)
        rows = self._db.execute(
            f"SELECT * FROM files WHERE state IN ({marks}) ORDER BY id", states
        ).fetchall()
        return [_entry(r) for r in rows]

    def agents_unaccounted(self) -> list[Entry]:
        """Launched agents whose end the daemon has not seen (it was down when they ended)."""
        rows = self._db.execute(
            "SELECT * FROM files WHERE state = ? AND pid IS NOT NULL AND ended IS NULL",
            (State.ACTED,),
        ).fetchall()
        return [_entry(r) for r in rows]

    def by_run_id(self, run_id: str) -> Entry | None:
        row = self._db.execute(
            "SELECT * FROM files WHERE run_id = ? ORDER BY id DESC LIMIT 1", (run_id,)
        ).fetchone()
        return _entry(row) if row else None

    def root_of(self, parent_run_id: str | None) -> str | None:
        """The first run of the pipeline run that `parent_run_id` belongs to."""
        if parent_run_id is None:
            return None
        row = self._db.execute(
            "SELECT root_run_id FROM files WHERE run_id = ? AND root_run_id IS NOT NULL LIMIT 1",
            (parent_run_id,),
        ).fetchone()
        return str(row[0]) if row else parent_run_id

    def recent(self, limit: int = 20) -> list[Entry]:
        rows = self._db.execute(
            "SELECT * FROM files ORDER BY updated DESC, id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [_entry(r) for r in rows]

    def pipeline_runs(self, limit: int = 20) -> list[Entry]:
        """The latest entry of each pipeline run: where that run stands."""
        rows = self._db.execute(
            "SELECT * FROM files WHERE id IN"
            " (SELECT max(id) FROM files WHERE root_run_id IS NOT NULL GROUP BY root_run_id)"
            " ORDER BY updated DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [_entry(r) for r in rows]

    def counts(self) -> dict[str, int]:
        return {
            state: n
            for state, n in self._db.execute("SELECT state, count(*) FROM files GROUP BY state")
        }

    # Operator commands (approve / reject), written by the CLI, consumed by the running daemon.
    # Each is answered once: its outcome ("applied", "refused", "crashed") and a one-line
    # message are stored with it, so the CLI can print them and a restart never replays it.

    def add_command(self, run_id: str, verb: str) -> int:
        cur = self._db.execute(
            "INSERT INTO commands (run_id, verb, created) VALUES (?, ?, ?)",
            (run_id, verb, time.time()),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def pending_commands(self) -> list[tuple[int, str, str]]:
        rows = self._db.execute(
            "SELECT id, run_id, verb FROM commands WHERE done IS NULL ORDER BY id"
        ).fetchall()
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    def finish_command(self, command_id: int, outcome: str, message: str) -> None:
        self._db.execute(
            "UPDATE commands SET done = ?, outcome = ?, message = ? WHERE id = ?",
            (time.time(), outcome, message, command_id),
        )

    def command_outcome(self, command_id: int) -> tuple[str, str] | None:
        """(outcome, message) once the daemon answered command `command_id`, else None."""
        row = self._db.execute(
            "SELECT outcome, message FROM commands WHERE id = ? AND done IS NOT NULL",
            (command_id,),
        ).fetchone()
        return (str(row[0]), str(row[1])) if row else None
