"""The SQLite ledger: every result file by path and content hash, its state and its decision.

It is what makes the daemon exactly-once across restarts and crashes: a (path, sha256) pair is
decided once, and a launch is recorded as an intent before it happens. The state machine lives
here, in one place: the states, their groups, and which move is allowed from where; every update
names the state the caller read, so two writers can never silently overwrite each other.
"""

from __future__ import annotations

import errno
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from .document.case import Case
from .document.decision import Decision
from .errors import LedgerCorrupt

__all__ = [
    "OUTCOMES",
    "RESUMABLE",
    "SETTLED",
    "TRANSIENT",
    "Entry",
    "Ledger",
    "State",
    "StateConflict",
]


class State(StrEnum):
    SEEN = "seen"
    """Validated and claimed; not yet decided."""
    DECIDED = "decided"
    """The decision is in the ledger; acting on it (launch, escalate, finish) is next."""
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


TRANSIENT = frozenset({State.SEEN, State.DECIDED, State.LAUNCHING})
"""Work in progress: a row stays here only while a worker holds it, or past a deadline when
the daemon stopped or failed mid-way (then `Recovery.sweep` resumes or settles it)."""

RESUMABLE = TRANSIENT | {State.WAITING}
"""Rows the pipeline takes up again when it meets their file: where it stopped, never anew."""

SETTLED = frozenset(
    {State.ACTED, State.DONE, State.ESCALATED, State.QUARANTINED, State.FAILED, State.CHANGED}
)
"""Nothing more happens without an operator (an escalation) or new content (a new file)."""

OUTCOMES = frozenset({State.ACTED, State.DONE, State.ESCALATED, State.FAILED})
"""Settled by a decision (quarantined and changed files never reached one)."""

_MOVES: Mapping[State, frozenset[State]] = {
    State.SEEN: frozenset({State.DECIDED, State.WAITING, State.QUARANTINED, State.FAILED}),
    State.WAITING: frozenset({State.DECIDED, State.FAILED}),
    State.DECIDED: frozenset({State.LAUNCHING, State.ESCALATED, State.DONE, State.FAILED}),
    State.LAUNCHING: frozenset({State.ACTED, State.ESCALATED, State.FAILED}),
    # An operator's approve acts on the escalation (launch or finish); reject finishes it.
    State.ESCALATED: frozenset({State.LAUNCHING, State.DONE, State.FAILED}),
    # A launch its launcher undid (a Slurm job that never started): made again, or given up.
    State.ACTED: frozenset({State.LAUNCHING, State.FAILED}),
}
"""Where each state may go (besides staying, to update fields). Other settled states go nowhere."""


class StateConflict(RuntimeError):
    """A ledger row was not in the state its writer read: a bug, never overwritten silently."""


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
    attempts INTEGER NOT NULL DEFAULT 0,
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

_CASES = """
CREATE TABLE IF NOT EXISTS cases (
    id INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    run_id TEXT,
    step INTEGER NOT NULL,
    label TEXT NOT NULL,
    source TEXT NOT NULL,
    updated REAL NOT NULL,
    body TEXT NOT NULL
);
"""
"""Labelled cases (issue 26), added after the first release: a ledger made before gets the
table at open. One row per file content; a later verdict on it replaces the earlier."""

_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 11, 13, 26

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
    decision: Decision | None
    action: str | None
    agent: str | None
    pid: int | None
    """The agent's process id (a unit's MainPID); a Slurm agent's job id."""
    exit_code: int | None
    ended: float | None
    """When the agent was seen to end (its exit code may still be unknown)."""
    created: float
    updated: float
    attempts: int
    """How often `Recovery.sweep` found the row stuck in a transient state and resumed it."""


def _entry(row: sqlite3.Row) -> Entry:
    values = dict(row)
    values["state"] = State(values["state"])
    if values["decision"]:
        values["decision"] = Decision.model_validate_json(values["decision"])
    return Entry(**values)


@contextmanager
def _corruption_named(path: Path) -> Iterator[None]:
    """SQLite's "malformed" and "not a database" become the one LedgerCorrupt message; its
    "disk is full" becomes the OSError (ENOSPC) that every other write on a full disk raises,
    so one handler serves both."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            raise LedgerCorrupt(path, str(exc)) from None
        if code == _SQLITE_FULL:
            raise OSError(errno.ENOSPC, f"ledger: {exc}", str(path)) from None
        raise


class Ledger:
    """One connection, used from the event loop's thread only (the CLI opens its own)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        """`readonly`: for `status`, which any user in the service's group may run.

        Raises LedgerCorrupt when the file is not an intact SQLite database."""
        self.path = path
        self._paths: set[str] | None = None
        with _corruption_named(path):
            if readonly:
                self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(
                    path, isolation_level=None, timeout=30.0, check_same_thread=False
                )
            self._db.row_factory = sqlite3.Row
            try:
                self._open(readonly)
            except BaseException:
                self._db.close()
                raise

    def _open(self, readonly: bool) -> None:
        if not readonly:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a process crash; only power loss can lose
            # the last.
            self._db.execute("PRAGMA synchronous=NORMAL")
        # A truncated file can open fine and fail pages later, mid-run: find out now.
        found = [row[0] for row in self._db.execute("PRAGMA quick_check")]
        if found != ["ok"]:
            problems = [p for text in found for p in text.splitlines() if not p.startswith("*")]
            more = f" and {len(problems) - 1} more problems" if len(problems) > 1 else ""
            raise LedgerCorrupt(self.path, f"{problems[0]}{more}")
        if readonly:
            return
        self._db.executescript(_SCHEMA)
        self._db.executescript(_CASES)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(files)")}
        if "attempts" not in columns:  # a ledger from before the sweep
            self._db.execute("ALTER TABLE files ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
        have = {row[1] for row in self._db.execute("PRAGMA table_info(commands)")}
        for column, kind in _COMMAND_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE commands ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self._db.close()

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with _corruption_named(self.path):
            return self._db.execute(sql, params)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with _corruption_named(self.path):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def get(self, entry_id: int) -> Entry:
        row = self._query("SELECT * FROM files WHERE id = ?", (entry_id,)).fetchone()
        return _entry(row)

    def claim(self, path: str, sha256: str, **fields: Any) -> tuple[Entry, bool]:
        """The entry for this exact content; True when it is new (never seen before).

        A new entry is recorded with `fields` (run_id, step, ...). When an earlier version of
        the same path was already decided, the new content is recorded as CHANGED and is not
        processed.
        """
        with self._transaction() as db:
            # Every version of this name at once (a handful): one query on the launch path.
            versions = db.execute("SELECT * FROM files WHERE path = ?", (path,)).fetchall()
            for row in versions:
                if row["sha256"] == sha256:
                    return _entry(row), False
            earlier = any(row["state"] not in (State.SEEN, State.QUARANTINED) for row in versions)
            state = State.CHANGED if earlier else State.SEEN
            reason = "content changed after it was decided; not re-run" if earlier else None
            row = self._insert(db, path, sha256, state, reason=reason, **fields)
        if self._paths is not None:
            self._paths.add(path)
        return _entry(row), True

    def is_empty(self) -> bool:
        """No row at all: a new ledger (or one whose rebuild was cut short)."""
        return self._query("SELECT 1 FROM files LIMIT 1").fetchone() is None

    def restore(self, rows: Iterable[tuple[str, str, State, dict[str, Any]]]) -> int:
        """Record settled rows from other evidence (decision records) when rebuilding: all in
        one transaction, so a rebuild cut short leaves the ledger empty and is done again.
        Returns how many were new."""
        added = 0
        with self._transaction() as db:
            for path, sha256, state, fields in rows:
                assert state in SETTLED, state
                if db.execute(
                    "SELECT 1 FROM files WHERE path = ? AND sha256 = ?", (path, sha256)
                ).fetchone():
                    continue
                self._insert(db, path, sha256, state, **fields)
                added += 1
        self._paths = None  # read again when next asked
        return added

    @staticmethod
    def _insert(
        db: sqlite3.Connection, path: str, sha256: str, state: State, **fields: Any
    ) -> sqlite3.Row:
        """Insert a row; the row as stored (RETURNING: no second query to read it back)."""
        if fields.get("decision") is not None:
            fields["decision"] = fields["decision"].model_dump_json()
        now = time.time()
        columns = "".join(f", {name}" for name in fields)
        marks = ", ?" * len(fields)
        # fetchall: the statement runs to its end inside the transaction, not at the COMMIT.
        [row] = db.execute(
            f"INSERT INTO files (path, sha256, state, created, updated{columns})"
            f" VALUES (?, ?, ?, ?, ?{marks}) RETURNING *",
            (path, sha256, state, now, now, *fields.values()),
        ).fetchall()
        stored: sqlite3.Row = row
        return stored

    def update(self, entry: Entry, state: State, *, touch: bool = True, **fields: Any) -> Entry:
        """Move `entry` to `state` (or keep it there) and set `fields`.

        Only from the state `entry` was read in, and only along an allowed move: anything else
        raises StateConflict, so a second writer can never silently undo the first.
        `touch=False`: an observation (an agent's end), not a step of the file; `updated` keeps
        the time of the file's last step (what `recent` orders by).
        """
        if state is not entry.state and state not in _MOVES.get(entry.state, ()):
            raise StateConflict(
                f"ledger row {entry.id} ({entry.path}): no move from {entry.state} to {state}"
            )
        if touch:
            fields["updated"] = time.time()
        values = dict(fields)
        if fields.get("decision") is not None:
            values["decision"] = fields["decision"].model_dump_json()
        columns = "".join(f", {name} = ?" for name in values)
        sql = f"UPDATE files SET state = ?{columns} WHERE id = ? AND state = ?"
        cur = self._query(sql, (state, *values.values(), entry.id, entry.state))
        if cur.rowcount != 1:
            now = self.get(entry.id).state
            raise StateConflict(
                f"ledger row {entry.id} ({entry.path}) is {now}, not {entry.state}:"
                f" not moved to {state}"
            )
        # The row is now exactly `entry` with these changes: no need to read it back.
        return replace(entry, state=state, **fields)

    def known_paths(self) -> set[str]:
        """Every file name the ledger has a record of: what a catch-up scan skips.

        Read once, then kept current by claim(): the daemon is the ledger's only writer.
        """
        if self._paths is None:
            self._paths = {row[0] for row in self._query("SELECT DISTINCT path FROM files")}
        return self._paths

    def in_state(self, *states: State, limit: int = -1) -> list[Entry]:
        """Rows in any of `states`, oldest first; `limit`: the newest that many."""
        marks = ", ".join("?" for _ in states)
        rows = self._query(
            f"SELECT * FROM (SELECT * FROM files WHERE state IN ({marks})"
            " ORDER BY id DESC LIMIT ?) ORDER BY id",
            (*states, limit),
        ).fetchall()
        return [_entry(r) for r in rows]

    def of_path(self, path: str, *states: State) -> list[Entry]:
        """The rows of file name `path` in any of `states`, oldest first."""
        marks = ", ".join("?" for _ in states)
        rows = self._query(
            f"SELECT * FROM files WHERE path = ? AND state IN ({marks}) ORDER BY id",
            (path, *states),
        ).fetchall()
        return [_entry(r) for r in rows]

    def stuck(self, older_than: float) -> list[Entry]:
        """Rows in a transient state not touched since `older_than` (a time.time())."""
        marks = ", ".join("?" for _ in TRANSIENT)
        rows = self._query(
            f"SELECT * FROM files WHERE state IN ({marks}) AND updated < ? ORDER BY id",
            (*TRANSIENT, older_than),
        ).fetchall()
        return [_entry(r) for r in rows]

    def agents_unaccounted(self) -> list[Entry]:
        """Launched agents whose end the daemon has not seen (it was down when they ended)."""
        rows = self._query(
            "SELECT * FROM files WHERE state = ? AND pid IS NOT NULL AND ended IS NULL",
            (State.ACTED,),
        ).fetchall()
        return [_entry(r) for r in rows]

    def by_run_id(self, run_id: str) -> Entry | None:
        row = self._query(
            "SELECT * FROM files WHERE run_id = ? ORDER BY id DESC LIMIT 1", (run_id,)
        ).fetchone()
        return _entry(row) if row else None

    def escalated(self, run_id: str) -> list[Entry]:
        """Every pending escalation of `run_id`: the same content under several names gives
        several."""
        rows = self._query(
            "SELECT * FROM files WHERE run_id = ? AND state = ? ORDER BY id",
            (run_id, State.ESCALATED),
        ).fetchall()
        return [_entry(r) for r in rows]

    def root_of(self, parent_run_id: str | None) -> str | None:
        """The first run of the pipeline run that `parent_run_id` belongs to."""
        if parent_run_id is None:
            return None
        row = self._query(
            "SELECT root_run_id FROM files WHERE run_id = ? AND root_run_id IS NOT NULL LIMIT 1",
            (parent_run_id,),
        ).fetchone()
        return str(row[0]) if row else parent_run_id

    def recent(self, limit: int = 20) -> list[Entry]:
        rows = self._query(
            "SELECT * FROM files ORDER BY updated DESC, id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [_entry(r) for r in rows]

    def pipeline_runs(self, limit: int = 20) -> list[Entry]:
        """The latest entry of each pipeline run: where that run stands."""
        rows = self._query(
            "SELECT * FROM files WHERE id IN"
            " (SELECT max(id) FROM files WHERE root_run_id IS NOT NULL GROUP BY root_run_id)"
            " ORDER BY updated DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [_entry(r) for r in rows]

    def counts(self) -> dict[str, int]:
        return {
            state: n for state, n in self._query("SELECT state, count(*) FROM files GROUP BY state")
        }

    # Operator commands (approve / reject), written by the CLI, consumed by the running daemon.
    # Each is answered once: its outcome ("applied", "refused", "crashed") and a one-line
    # message are stored with it, so the CLI can print them and a restart never replays it.

    def add_command(self, run_id: str, verb: str) -> int:
        cur = self._query(
            "INSERT INTO commands (run_id, verb, created) VALUES (?, ?, ?)",
            (run_id, verb, time.time()),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def pending_commands(self) -> list[tuple[int, str, str]]:
        rows = self._query(
            "SELECT id, run_id, verb FROM commands WHERE done IS NULL ORDER BY id"
        ).fetchall()
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    def finish_command(self, command_id: int, outcome: str, message: str) -> None:
        self._query(
            "UPDATE commands SET done = ?, outcome = ?, message = ? WHERE id = ?",
            (time.time(), outcome, message, command_id),
        )

    def command_outcome(self, command_id: int) -> tuple[str, str] | None:
        """(outcome, message) once the daemon answered command `command_id`, else None."""
        row = self._query(
            "SELECT outcome, message FROM commands WHERE id = ? AND done IS NOT NULL",
            (command_id,),
        ).fetchone()
        return (str(row[0]), str(row[1])) if row else None

    # Labelled cases: an operator's verdicts (approve, reject, correct) and imported ones,
    # written by the CLI whether the daemon runs or not, read by the decisions' case vote.

    def add_case(self, case: Case) -> bool:
        """Store `case`; True when its file content had no case yet (else it replaces it)."""
        with self._transaction() as db:
            new = not db.execute("SELECT 1 FROM cases WHERE sha256 = ?", (case.sha256,)).fetchone()
            db.execute(
                "INSERT INTO cases (sha256, run_id, step, label, source, updated, body)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO UPDATE SET"
                " run_id = excluded.run_id, step = excluded.step, label = excluded.label,"
                " source = excluded.source, updated = excluded.updated, body = excluded.body",
                (case.sha256, case.run_id, case.agent_metadata.pipeline_step, case.label,
                 case.source, time.time(), case.model_dump_json()),
            )  # fmt: skip
        return new

    def cases(self) -> list[Case]:
        """Every labelled case, oldest first; none in a ledger from before cases (read-only)."""
        if not self._has_cases():
            return []
        rows = self._query("SELECT body FROM cases ORDER BY id").fetchall()
        return [Case.model_validate_json(r[0]) for r in rows]

    def cases_mark(self) -> tuple[int, float]:
        """(how many cases, when the last was written): changes whenever a case is added."""
        if not self._has_cases():
            return 0, 0.0
        n, last = self._query("SELECT count(*), max(updated) FROM cases").fetchone()
        return int(n), float(last or 0.0)

    def _has_cases(self) -> bool:
        return bool(
            self._query(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'cases'"
            ).fetchone()
        )
