"""Bounded work: a huge result file is read and checked off the event loop, and refused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prng_daemon.config import load_config
from prng_daemon.document.decision import Decision
from prng_daemon.document.metadata import MAX_FILES, AgentMetadata
from prng_daemon.engine import INLINE_CHECK_BYTES, Engine
from prng_daemon.handlers.act.local import LocalLauncher
from prng_daemon.ledger import Entry, Ledger

from .helpers import free_port
from .workspace import make_workspace, result_document, run_id

INPUTS = 200_000
"""As in the report that found it: 15 MB, seconds of CPU to check on the loop."""


def big_result(path: Path) -> Path:
    inputs = [
        {"file": f"inputs/part_{i:06d}.bin", "hash": "sha256:0123456789ab"} for i in range(INPUTS)
    ]
    path.write_text(json.dumps(result_document(2, run_id(2, 1), inputs=inputs)))
    return path


def checked_with_the_loop_turning(
    tmp_path: Path, make: Callable[[Path], Path]
) -> tuple[int, Entry]:
    """Process one file with a probe on the loop: how often the probe ran, and the ledger row."""
    ws = make_workspace(tmp_path, free_port())
    config = load_config(ws.config_path)
    config.daemon.state_dir.mkdir()
    path = make(ws.results / "result.json")
    ledger = Ledger(config.daemon.ledger_path)

    async def never(meta: AgentMetadata, payload: Mapping[str, Any]) -> Decision:
        raise AssertionError("a file over the limits is never decided")

    async def scenario() -> int:
        engine = Engine(
            config,
            ledger,
            never,
            lambda on_exit: LocalLauncher(config.daemon.state_dir / "launches", tmp_path, on_exit),
        )
        ticks = 0

        async def probe() -> None:  # what the status loop and watchdog need: turns of the loop
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.create_task(probe())
        await asyncio.sleep(0)
        before = ticks
        await engine.process(path, "closed")
        during = ticks - before
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return during

    try:
        during = asyncio.run(scenario())
        [entry] = ledger.recent(10)
    finally:
        ledger.close()
    return during, entry


def test_a_huge_file_is_checked_while_the_loop_keeps_turning(tmp_path: Path) -> None:
    during, entry = checked_with_the_loop_turning(tmp_path, big_result)
    assert during >= 5, f"the probe ran {during} times while the file was checked"
    assert entry.state.value == "quarantined"
    assert entry.reason == (
        f"/agent_metadata/inputs: has {INPUTS} items, more than the {MAX_FILES} allowed"
    )


def small_bad_result(path: Path) -> Path:
    """Under the size checked on the loop, but thousands of schema errors for jsonschema to name
    (a quarter of a second of CPU)."""
    outputs = ["../x"] * (INLINE_CHECK_BYTES // 10)
    path.write_text(json.dumps(result_document(2, run_id(2, 1), outputs=outputs)))
    assert path.stat().st_size <= INLINE_CHECK_BYTES
    return path


def test_a_small_file_that_needs_jsonschema_is_checked_off_the_loop(tmp_path: Path) -> None:
    during, entry = checked_with_the_loop_turning(tmp_path, small_bad_result)
    assert during >= 5, f"the probe ran {during} times while the file was checked"
    assert entry.state.value == "quarantined"
    assert entry.reason is not None
    assert entry.reason.startswith("/agent_metadata/outputs/0: must be a relative path")
