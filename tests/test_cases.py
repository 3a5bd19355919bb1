"""Operator verdicts as labelled cases (issue 26): `correct`, `cases export|import`, the
ledger's cases table, and the cases' vote in the next decision of a running daemon."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from prng_daemon.config import PolicyConfig
from prng_daemon.document.decision import Decision
from prng_daemon.handlers.decide.vote import CaseIndex
from prng_daemon.ledger import Ledger, State

from .fake_llama import FakeLlama
from .helpers import free_port, wait_until
from .test_status_cli import cli
from .workspace import (
    Workspace,
    drop,
    make_workspace,
    result_document,
    run_id,
    running,
    wait_ready,
)

OVERFIT = "Train AUC 0.99 on every fold; holdout numbers look fine."
"""A success whose text the model reads as supported, and an operator knows better."""


def ledger_of(ws: Workspace) -> Ledger:
    return Ledger(ws.root / "state" / "ledger.sqlite3")


def record_of(ws: Workspace, name: str) -> dict[str, Any]:
    [path] = (ws.results / "decisions").glob(f"{Path(name).stem}.*.decision.json")
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def decided(tmp_path: Path, fake: FakeLlama) -> tuple[Workspace, str]:
    """A workspace whose daemon decided (proceed) and launched one step 2 result, stopped."""
    ws = make_workspace(tmp_path, fake.port, policy={"vote_min_cases": 1})
    rid = run_id(2, 1)
    with running(ws):
        wait_ready(ws)
        drop(ws.results, "r.json", result_document(2, rid, reasoning=OVERFIT))
        wait_until(lambda: ws.finished(1) and ws.launches(), 15, what="r.json acted")
    return ws, rid


def test_correct_without_a_daemon_keeps_a_case_and_acts_on_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    ws, rid = decided(tmp_path, fake)
    ledger = ledger_of(ws)
    try:
        [before] = ledger.recent()
    finally:
        ledger.close()
    code, out, err = cli(capsys, ws, "correct", rid, "--should", "escalate", "--why", "AUC 0.99")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"{rid}: the daemon said proceed (llm); it should have been escalate:"
        " kept as a labelled case (1 cases)",
        "  nothing was run, stopped or re-run: a correction is knowledge for the next"
        " decisions, not an action on an agent",
    ]
    ledger = ledger_of(ws)
    try:
        [case] = ledger.cases()
        assert ledger.recent() == [before], "the file's row is as it was"
        assert ledger.pending_commands() == []
    finally:
        ledger.close()
    assert (case.run_id, case.file, case.label, case.source) == (
        rid,
        "r.json",
        "escalate",
        "correct",
    )
    assert case.why == "AUC 0.99" and case.operator and case.given_at
    assert case.agent_metadata.reasoning == OVERFIT
    assert case.decision is not None and case.decision.action == "proceed"
    assert case.decision.signals["model"]["action"] == "proceed"
    assert len(ws.launches()) == 1, "no agent started or re-run"


def test_decide_from_the_cli_votes_with_the_ledgers_cases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    ws, rid = decided(tmp_path, fake)
    assert cli(capsys, ws, "correct", rid, "--should", "retry")[0] == 0
    code, out, _ = cli(capsys, ws, "decide", str(ws.results / "r.json"), "--json")
    decision = json.loads(out)
    assert code == 0 and decision["signals"]["cases"]["neighbours"][0]["run_id"] == rid
    # The one case's retry (strength 1.00) is stronger than the model's proceed (p=0.89).
    assert (decision["action"], decision["decided_by"]) == ("retry", "cases")


def test_decide_from_the_cli_decides_without_cases_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    ws = make_workspace(tmp_path, fake.port)
    (ws.root / "state").mkdir()
    (ws.root / "state" / "ledger.sqlite3").write_bytes(b"not a database" * 100)
    result = drop(ws.results, "r.json", result_document(2, run_id(2, 1)))
    code, out, err = cli(capsys, ws, "decide", str(result), "--json")
    assert code == 0 and json.loads(out)["action"] == "proceed"
    assert err.startswith("decide: without labelled cases: cannot read the ledger: ")


def test_correct_says_why_it_cannot_keep_a_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    ws = make_workspace(tmp_path, fake.port, policy={"vote_min_cases": 1})
    code, _, err = cli(capsys, ws, "correct", run_id(2, 1), "--should", "retry")
    assert code == 1 and err.startswith(f"{run_id(2, 1)}: no ledger at ")
    ws, rid = decided(tmp_path / "again", fake)
    code, _, err = cli(capsys, ws, "correct", run_id(2, 9), "--should", "retry")
    assert (code, err) == (1, f"{run_id(2, 9)}: no such run in the ledger\n")
    drop(ws.results, "r.json", result_document(2, rid, reasoning="rewritten"))
    code, _, err = cli(capsys, ws, "correct", rid, "--should", "retry")
    assert (code, err) == (1, f"not kept: {rid}: r.json changed since it was decided\n")
    ledger = ledger_of(ws)
    try:
        assert ledger.cases() == []
    finally:
        ledger.close()


def test_a_correction_to_a_running_daemon_steers_its_next_decision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    """The model says proceed for both files; the operator's correction of the first is the
    nearest case of the second, and stronger than the model: the second escalates, and its
    record names each signal. The first file's agent is neither stopped nor run again."""
    ws = make_workspace(tmp_path, fake.port, policy={"vote_min_cases": 1})
    first, second = run_id(2, 1), run_id(2, 2)
    with running(ws):
        wait_ready(ws)
        drop(ws.results, "a.json", result_document(2, first, reasoning=OVERFIT))
        wait_until(lambda: ws.finished(1) and ws.launches(), 15, what="a.json acted")
        code, out, _ = cli(capsys, ws, "correct", first, "--should", "escalate")
        assert code == 0 and "kept as a labelled case (1 cases)" in out
        drop(ws.results, "b.json", result_document(2, second, reasoning=OVERFIT + " Done."))
        wait_until(lambda: ws.finished(2), 15, what="b.json decided")
        code, out, _ = cli(capsys, ws, "status")
        assert "\nlabelled cases: 1 (add: prng-llm-daemon correct RUN_ID" in out
    assert ws.ledger_states() == {"acted": 1, "escalated": 1}
    assert len(ws.launches()) == 1
    record = record_of(ws, "b.json")
    assert (record["decision"], record["decided_by"]) == ("escalate", "guardrail")
    signals = record["signals"]
    assert signals["model"]["action"] == "proceed"
    assert signals["rules"] == {"action": "proceed", "settled": False}
    assert signals["cases"]["action"] == "escalate" and signals["cases"]["strength"] == 1.0
    assert [n["run_id"] for n in signals["cases"]["neighbours"]] == [first]
    assert record["reasoning"].startswith(
        "guardrail: the cases are the stronger: the model says proceed"
    )
    assert "cases" not in record_of(ws, "a.json")["signals"], "no cases then"


def test_cases_export_and_import_as_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    ws, rid = decided(tmp_path / "one", fake)
    assert cli(capsys, ws, "correct", rid, "--should", "retry")[0] == 0
    code, exported, err = cli(capsys, ws, "cases", "export")
    assert (code, err) == (0, "cases export: 1 cases\n")
    [line] = exported.splitlines()
    assert json.loads(line)["label"] == "retry"
    other, _ = decided(tmp_path / "two", fake)
    jsonl = tmp_path / "cases.jsonl"
    jsonl.write_text(exported)
    assert cli(capsys, other, "cases", "import", str(jsonl))[:2] == (
        0, f"{jsonl}: 1 new cases, 0 replaced\n"
    )  # fmt: skip
    assert cli(capsys, other, "cases", "import", str(jsonl))[1].endswith(
        "0 new cases, 1 replaced\n"
    )
    # Every line is checked before any is stored.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(exported.replace('"retry"', '"relaunch"', 1) + exported)
    fresh, _ = decided(tmp_path / "three", fake)
    code, _, err = cli(capsys, fresh, "cases", "import", str(bad))
    assert code == 1 and err.startswith(f"{bad}:1: label: ")
    ledger = ledger_of(fresh)
    try:
        assert ledger.cases() == []
    finally:
        ledger.close()
    ledger = ledger_of(other)
    try:
        [case] = ledger.cases()
    finally:
        ledger.close()
    assert case.model_dump_json() == line


def test_a_ledger_from_before_cases_gets_the_table_and_a_read_only_one_has_none(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite3"
    Ledger(path).close()
    with closing(sqlite3.connect(path)) as db:
        db.execute("DROP TABLE cases")
    old = Ledger(path, readonly=True)
    try:
        assert (old.cases(), old.cases_mark()) == ([], (0, 0.0))
    finally:
        old.close()
    Ledger(path).close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM cases").fetchone() == (0,)


def test_status_shows_a_confidence_as_calibrated_only_once_fitted_on_cases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = make_workspace(tmp_path, free_port())
    ledger = ledger_of(ws)
    try:
        for name, signals in (("fitted.json", {"calibrated_on": 40}), ("model.json", {})):
            decision = Decision(
                action="proceed", confidence=0.9, calibrated_confidence=0.912, reasoning="",
                suggested_params={}, decided_by="llm", llm_metadata={}, signals=signals,
            )  # fmt: skip
            seen, _ = ledger.claim(name, name * 4, run_id=run_id(2, len(name)), step=2)
            decided = ledger.update(seen, State.DECIDED, decision=decision, action="proceed")
            ledger.update(decided, State.DONE)
    finally:
        ledger.close()
    code, out, _ = cli(capsys, ws, "status")
    lines = out.splitlines()
    assert "labelled cases: 0 (add: prng-llm-daemon correct RUN_ID --should ACTION)" in lines
    [fitted] = [line for line in lines if "fitted.json" in line]
    [model] = [line for line in lines if "model.json" in line]
    assert fitted.endswith("fitted.json  done  proceed (calibrated 0.91)")
    assert model.endswith("model.json  done  proceed")


def test_the_shipped_seed_imports_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: FakeLlama
) -> None:
    """examples/seed-cases.jsonl: the project's 295 labelled results, each with the decision
    the daemon made on it; enough for the vote and the calibration at once."""
    ws, _ = decided(tmp_path, fake)
    seed = Path(__file__).resolve().parents[1] / "examples" / "seed-cases.jsonl"
    assert cli(capsys, ws, "cases", "import", str(seed))[:2] == (
        0, f"{seed}: 295 new cases, 0 replaced\n"
    )  # fmt: skip
    ledger = ledger_of(ws)
    try:
        cases = ledger.cases()
    finally:
        ledger.close()
    assert all(c.source == "seed" and c.decision is not None for c in cases)
    index = CaseIndex(cases, PolicyConfig())
    assert index.calibration.size == 295
    assert index.vote(cases[0].agent_metadata) is not None
