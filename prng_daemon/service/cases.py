"""How an operator's verdicts become labelled cases (docs/learning.md): an `approve`,
`approve --retry` or `reject` of an escalation, a `correct` of a decision the daemon took alone,
and `cases export|import` as JSON lines. A case is knowledge for the decisions' vote, never an
action: storing one starts, stops or re-runs nothing."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TextIO

from pydantic import ValidationError

from ..config import Config
from ..document.case import Case, Source, new_case
from ..document.decision import Action
from ..errors import DaemonError, ResultRejected
from ..handlers.validate import load_result
from ..ledger import OUTCOMES, Entry, Ledger

__all__ = ["VERDICT_LABELS", "case_of", "export_cases", "import_cases"]

VERDICT_LABELS: dict[str, Action] = {
    "approve": "proceed",
    "approve-retry": "retry",
    # Stopping the run was right: the daemon was right to ask a person.
    "reject": "escalate",
}
"""The right answer each operator verdict on an escalation says."""


def case_of(config: Config, entry: Entry, label: Action, source: Source, why: str = "") -> Case:
    """The labelled case for ledger row `entry`: the file's metadata (read again from the
    results dir: it must still be the content decided), the daemon's decision, the label.
    Raises DaemonError with the reason it cannot be made."""
    if entry.decision is None or entry.state not in OUTCOMES:
        raise DaemonError(f"{entry.run_id}: not decided yet (state: {entry.state.value})")
    settings = config.daemon
    try:
        loaded = load_result(
            settings.results_dir / entry.path,
            max_bytes=settings.max_result_bytes,
            root=settings.results_dir,
        )
    except ResultRejected as exc:
        raise DaemonError(f"{entry.run_id}: its result file {entry.path}: {exc}") from None
    except FileNotFoundError:
        raise DaemonError(f"{entry.run_id}: its result file {entry.path} is gone") from None
    if loaded.sha256 != entry.sha256:
        raise DaemonError(f"{entry.run_id}: {entry.path} changed since it was decided")
    return new_case(
        loaded.document.agent_metadata,
        sha256=entry.sha256,
        file=entry.path,
        decision=entry.decision,
        label=label,
        source=source,
        why=why,
    )


def export_cases(ledger: Ledger, out: TextIO) -> int:
    """Write every case as one JSON line; how many."""
    cases = ledger.cases()
    for case in cases:
        out.write(case.model_dump_json() + "\n")
    return len(cases)


def import_cases(ledger: Ledger, lines: Iterable[str], name: str) -> tuple[int, int]:
    """Store the cases of JSON `lines` (from `name`): (new, replaced). Every line is checked
    before any is stored: a bad one raises DaemonError naming its line, and nothing changes."""
    cases = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            cases.append(Case.model_validate_json(line))
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(p) for p in problem["loc"]) or "(line)"
            raise DaemonError(f"{name}:{number}: {where}: {problem['msg']}") from None
    new = sum(ledger.add_case(case) for case in cases)
    return new, len(cases) - new
