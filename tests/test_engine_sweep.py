"""The engine on its own: the sweep of rows left mid-way (`recovery`), and the answers of
`resolve` (`commands`).

Real ledger, real launcher and agents, real files; the decider is the engine's injected
decision function returning a fixed decision (which decision is not what is tested here).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from prng_daemon.commands import Commands
from prng_daemon.config import load_config
from prng_daemon.document.decision import Decision
from prng_daemon.document.files import record_name
from prng_daemon.document.metadata import AgentMetadata
from prng_daemon.engine import Engine
from prng_daemon.handlers.act.launcher import launch_key
from prng_daemon.handlers.act.local import LocalLauncher
from prng_daemon.ledger import Ledger, State
from prng_daemon.recovery import MAX_RESUMES

from .helpers import free_port, wait_until
from .workspace import Workspace, drop, make_workspace, result_document, run_id

DEADLINE = 300.0


def _engine(ws: Workspace, action: str) -> Engine:
    config = load_config(ws.config_path)

    async def decide(meta: AgentMetadata, payload: Mapping[str, Any]) -> Decision:
        return Decision(action=action, confidence=0.9, calibrated_confidence=None,
                        reasoning=f"{action} (test)", suggested_params={}, path="rules",
                        llm_metadata={})  # fmt: skip

    settings = config.daemon
    return Engine(
        config,
        Ledger(settings.ledger_path),
        decide,
        lambda on_exit: LocalLauncher(settings.state_dir / "launches", settings.logs_dir, on_exit),
    )


def run(
    tmp_path: Path, action: str, body: Callable[[Workspace, Engine], Awaitable[None]]
) -> Workspace:
    ws = make_workspace(tmp_path, free_port())

    async def main() -> None:
        engine = _engine(ws, action)
        try:
            await body(ws, engine)
        finally:
            await engine.launcher.stop()
            engine.ledger.close()

    asyncio.run(main())
    return ws


def _state(engine: Engine, name: str) -> tuple[State, str | None, int]:
    [entry] = [e for e in engine.ledger.recent(100) if e.path == name]
    return entry.state, entry.reason, entry.attempts


def _decided_but_not_acted(engine: Engine, ws: Workspace, name: str, action: str) -> None:
    """The state a crash (or a full disk) between deciding and acting leaves behind."""
    path = drop(ws.results, name, result_document(2, run_id(2, 1)))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    entry, _ = engine.ledger.claim(name, sha, run_id=run_id(2, 1), step=2)
    decision = Decision(
        action=action, confidence=0.9, calibrated_confidence=None, reasoning="before the crash",
        suggested_params={}, decided_by="rules", llm_metadata={},
    )  # fmt: skip
    engine.ledger.update(entry, State.DECIDED, action=action, decision=decision)


def _unwritable_record(ws: Workspace, engine: Engine) -> Path:
    """A directory where the decision record goes: writing it fails (as on a full disk)."""
    [entry] = engine.ledger.recent(1)
    record = ws.results / "decisions" / record_name(Path(entry.path), entry.sha256, "decision")
    record.mkdir(parents=True)
    return record


def test_a_row_stuck_mid_way_is_resumed_then_settled_failed_after_its_resumes(
    tmp_path: Path,
) -> None:
    async def body(ws: Workspace, engine: Engine) -> None:
        _decided_but_not_acted(engine, ws, "r.json", "escalate")
        _unwritable_record(ws, engine)
        now = time.time()
        assert engine.recovery.sweep(engine.config.daemon, now) == [], "not yet past the deadline"
        with capture_logs() as logs:
            for n in range(1, MAX_RESUMES + 1):
                now += DEADLINE + 1
                [path] = engine.recovery.sweep(engine.config.daemon, now)
                assert engine.recovery.sweep(engine.config.daemon, now + DEADLINE + 1) == [], (
                    "handed out, not stuck"
                )
                assert _state(engine, "r.json") == (State.DECIDED, None, n)
                with pytest.raises(IsADirectoryError):
                    await engine.process(path, "retry")
            now += DEADLINE + 1
            assert engine.recovery.sweep(engine.config.daemon, now) == []
        state, reason, _ = _state(engine, "r.json")
        assert (state, reason) == (State.FAILED, f"still decided after {MAX_RESUMES} resumes")
        [stuck] = [e for e in logs if e["event"] == "result.stuck"]
        assert stuck["log_level"] == "error" and stuck["state"] == "decided"

    run(tmp_path, "escalate", body)


def test_a_resumed_row_finishes_where_it_stopped_without_a_new_decision(
    tmp_path: Path,
) -> None:
    async def body(ws: Workspace, engine: Engine) -> None:
        _decided_but_not_acted(engine, ws, "r.json", "escalate")
        [path] = engine.recovery.sweep(engine.config.daemon, at_start=True)
        assert _state(engine, "r.json")[2] == 0, "a resume at start is not counted"
        assert await engine.process(path, "retry")
        state, reason, _ = _state(engine, "r.json")
        assert (state, reason) == (State.ESCALATED, "before the crash"), "the recorded decision"

    run(tmp_path, "proceed", body)


def test_a_stuck_row_whose_file_is_gone_is_settled_at_once(tmp_path: Path) -> None:
    async def body(ws: Workspace, engine: Engine) -> None:
        _decided_but_not_acted(engine, ws, "r.json", "proceed")
        (ws.results / "r.json").unlink()
        assert engine.recovery.sweep(engine.config.daemon, at_start=True) == []
        state, reason, _ = _state(engine, "r.json")
        assert (state, reason) == (State.FAILED, "the file was deleted while decided")

    run(tmp_path, "proceed", body)


def test_a_launch_intent_left_by_a_failed_record_write_is_settled_by_its_marker(
    tmp_path: Path,
) -> None:
    """LAUNCHING with a marker (the agent ran) resumes to ACTED, never to a second launch."""

    async def body(ws: Workspace, engine: Engine) -> None:
        _decided_but_not_acted(engine, ws, "r.json", "proceed")
        record = _unwritable_record(ws, engine)  # the agent is launched, then this fails
        with pytest.raises(IsADirectoryError):
            await engine.process(ws.results / "r.json", "retry")
        assert _state(engine, "r.json")[0] is State.LAUNCHING
        record.rmdir()
        [path] = engine.recovery.sweep(engine.config.daemon, time.time() + DEADLINE + 1)
        assert await engine.process(path, "retry")
        state, reason, _ = _state(engine, "r.json")
        assert state is State.ACTED and reason and "already happened" in reason
        assert json.loads(record.read_text())["outcome"] == "acted"

    ws = run(tmp_path, "proceed", body)
    wait_until(ws.launches, 10, what="the one agent")
    assert len(list((ws.root / "state" / "launches").iterdir())) == 1
    assert len(ws.launches()) == 1


def test_resolve_answers_instead_of_raising_and_keeps_the_escalation(tmp_path: Path) -> None:
    """Deleted, changed, invalid files and a removed agent: (False, why), still escalated."""
    rid = run_id(2, 1)

    async def body(ws: Workspace, engine: Engine) -> None:
        for name in ("gone.json", "changed.json", "invalid.json", "ok.json"):
            assert await engine.process(drop(ws.results, name, result_document(2, rid)), "closed")
        (ws.results / "gone.json").unlink()
        drop(ws.results, "changed.json", result_document(2, rid, confidence=0.5))
        (ws.results / "invalid.json").write_text("{")
        applied, message = await Commands(engine).resolve(rid, "approve")
        assert not applied
        assert message.startswith(f"{rid}: still escalated: ")
        assert message.endswith("; approved: ok.json: started full_scoring_agent")
        assert "gone.json: the result file was deleted since it was escalated" in message
        assert "changed.json: the result file changed since it was escalated" in message
        assert "invalid.json: the result file cannot be used: not valid JSON" in message
        assert len(list((ws.root / "state" / "launches").iterdir())) == 1, "ok.json's only"
        config = engine.config
        agents = {k: v for k, v in config.agents.items() if k != "full_scoring_agent"}
        engine.reconfigure(config.model_copy(update={"agents": agents}))  # as a reload would
        drop(ws.results, "changed.json", result_document(2, rid))  # restored
        applied, message = await Commands(engine).resolve(rid, "approve")
        assert not applied and "changed.json: agent full_scoring_agent is not configured" in message
        assert await Commands(engine).resolve(rid, "reject") == (
            True,
            f"rejected: {rid} -> gone.json: stops here; changed.json: stops here;"
            " invalid.json: stops here",
        )  # fmt: skip
        assert await Commands(engine).resolve(rid, "reject") == (
            False, f"{rid}: no pending escalation (state: acted)"
        )  # fmt: skip
        assert await Commands(engine).resolve("step2_20260101_000000_ffffff", "approve") == (
            False, "step2_20260101_000000_ffffff: no pending escalation (state: unknown)"
        )  # fmt: skip
        assert engine.ledger.counts() == {"acted": 1, "done": 3}
        records = {
            json.loads(p.read_text())["result_file"].rsplit("/", 1)[1]: json.loads(p.read_text())
            for p in (ws.results / "decisions").glob("*.decision.json")
        }
        assert records["gone.json"]["outcome"] == "done", "a rejection is recorded"
        assert records["ok.json"]["outcome"] == "acted"

    run(tmp_path, "escalate", body)


def test_markers_are_named_after_the_file_version(tmp_path: Path) -> None:
    keys = {launch_key("r.json", "a" * 64), launch_key("r.json", "b" * 64),
            launch_key("s.json", "a" * 64)}  # fmt: skip
    assert len(keys) == 3 and all(len(k) == 32 for k in keys)
