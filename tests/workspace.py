"""A daemon workspace for tests: config, results dir, counting agents, the daemon as a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prng_daemon.document.pipeline import PIPELINE
from prng_daemon.ledger import SETTLED, Ledger

from .helpers import wait_until

AGENT = """\
import os, pathlib, sys
marker_dir = pathlib.Path(os.environ["MARKERS"])
launch = os.environ["PRNG_LAUNCH_ID"]
(marker_dir / f"{launch}-{os.getpid()}").write_text(" ".join(sys.argv[1:]))
"""


@dataclass
class Workspace:
    root: Path
    config_path: Path

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def markers(self) -> Path:
        return self.root / "markers"

    def launches(self) -> list[str]:
        return sorted(p.name for p in self.markers.iterdir())

    def launch_ids(self) -> list[str]:
        return [name.split("-")[0] for name in self.launches()]

    def ledger_states(self) -> dict[str, int]:
        ledger = Ledger(self.root / "state" / "ledger.sqlite3")
        try:
            return ledger.counts()
        finally:
            ledger.close()

    def finished(self, n: int) -> bool:
        """`n` files settled with their agents' launches counted."""
        try:
            counts = self.ledger_states()
        except Exception:
            return False
        return sum(counts.get(s, 0) for s in SETTLED) >= n

    def start(
        self,
        *extra: str,
        env: Mapping[str, str] | None = None,
        stderr: int | None = None,
        prefix: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """`prng-llm-daemon run`; `env` is added to this process's environment, and `stderr`
        (a file descriptor; default: daemon.log, with stdout) is where its log lines go.
        `prefix`: a command that execs the rest (the daemon keeps the process's pid)."""
        log = open(self.root / "daemon.log", "ab")  # noqa: SIM115 - owned by the process
        try:
            return subprocess.Popen(
                [*prefix, sys.executable, "-m", "prng_daemon", *extra, "run", "--config",
                 str(self.config_path)],
                stdout=log, stderr=log if stderr is None else stderr,
                env={**os.environ, **(env or {})},
            )  # fmt: skip
        finally:
            log.close()

    def edit_config(self, edit: Callable[[dict[str, Any]], object]) -> None:
        """Change the config file in place (tests then restart or SIGHUP the daemon)."""
        config = json.loads(self.config_path.read_text())
        edit(config)
        self.config_path.write_text(json.dumps(config, indent=2))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The daemon's log events so far (only those called `name`, if given)."""
        lines = (self.root / "daemon.log").read_text().splitlines()
        found = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in found if name is None or e["event"] == name]


@contextmanager
def running(ws: Workspace, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon started and ready; stopped with SIGTERM at the end, which must exit 0."""
    proc = ws.start(*extra)
    try:
        wait_ready(ws)
        yield proc
    finally:
        code = stop(proc)
    assert code == 0, f"the daemon exited {code} on SIGTERM"


def make_workspace(root: Path, llm_url_port: int, **overrides: Any) -> Workspace:
    """Both servers unmanaged at `llm_url_port` (a FakeLlama or a real llama-server)."""
    (root / "markers").mkdir(parents=True)
    (root / "results").mkdir()
    agent = root / "agent.py"
    agent.write_text(AGENT)
    agents = {
        name: {
            "argv": [sys.executable, str(agent), "{parent_run_id}", "{step}", "{params_file}"],
            "env": {"MARKERS": str(root / "markers")},
            "timeout_seconds": 30,
        }
        for name in {s.agent for s in PIPELINE}
    }
    server = {"model": "fake.gguf", "port": llm_url_port, "managed": False}
    config: dict[str, Any] = {
        "orchestrator": dict(server),
        "math": dict(server),
        "daemon": {
            "results_dir": "results",
            "state_dir": "state",
            "logs_dir": "logs",
            "models_dir": "models",
            "rescan_interval_seconds": 1,
        },
        "agents": agents,
        "policy": {"confidence_threshold": 0.1},
    }
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    path = root / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return Workspace(root, path)


def result_document(step_number: int, run_id: str, **meta: Any) -> dict[str, Any]:
    row = PIPELINE[step_number - 1]
    return {
        "payload": {"survivors": 742846},
        "agent_metadata": {
            "run_id": run_id,
            "pipeline_step": row.number,
            "pipeline_step_name": row.name,
            "follow_up_agent": row.follow_up_agent,
            "confidence": 0.9,
            "success_criteria_met": True,
            **meta,
        },
    }


def run_id(step_number: int, n: int) -> str:
    return f"step{step_number}_20260101_000000_{n:06x}"


def drop(results: Path, name: str, document: dict[str, Any]) -> Path:
    """Write a result the way agents should: a temp file, then an atomic rename."""
    tmp = results / f".{name}.tmp"
    tmp.write_text(json.dumps(document))
    os.replace(tmp, results / name)
    return results / name


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def ready(ws: Workspace) -> bool:
    return (
        any(e.get("event") == "daemon.started" for e in ws.events())
        if (ws.root / "daemon.log").exists()
        else False
    )


def wait_ready(ws: Workspace, timeout: float = 20.0) -> None:
    wait_until(lambda: ready(ws), timeout, what="the daemon to start")
