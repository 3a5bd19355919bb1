"""The status file: the running daemon publishes its state there (`publish`, at least every
HEARTBEAT_SECONDS), and `prng-llm-daemon status` reads it with the ledger (`collect`, `render`)."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ..config import Config
from ..document.files import write_json_atomic
from ..document.names import printable
from ..document.pipeline import SERVER_NAMES, ServerName
from ..errors import DaemonError
from ..handlers.act import LauncherChoice
from ..handlers.act.launcher import AgentLauncher, clock
from ..ledger import Ledger, State
from ..servers.gpu import where
from ..servers.spawn import exit_text
from ..servers.supervisor import ChildStatus

__all__ = ["HEARTBEAT_SECONDS", "collect", "daemon_state", "publish", "render", "status_path"]

HEARTBEAT_SECONDS = 2.0
"""The running daemon rewrites its status file at least this often."""

ATTENTION = 10
"""How many of the latest FAILED rows `status` shows..."""
ATTENTION_SECONDS = 24 * 3600.0
"""...of those that failed this recently (older ones are history, not news)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status_path(config: Config) -> Path:
    """Where the running daemon publishes its state for `prng-llm-daemon status`."""
    return config.daemon.state_dir / "status.json"


def publish(
    config: Config,
    *,
    started: float,
    line: str,
    stopped: bool,
    servers: Mapping[ServerName, ChildStatus],
    queued: int,
    launcher: AgentLauncher,
    choice: LauncherChoice,
) -> None:
    """Write the status file (not fsync'd: it is rewritten every heartbeat)."""
    write_json_atomic(
        status_path(config),
        durable=False,
        document={
            "pid": os.getpid(),
            "started": started,
            "heartbeat": time.time(),
            "stopped": stopped,
            "status": line,
            "servers": {
                name: {
                    "state": s.state.value,
                    "pid": s.pid,
                    "restarts": s.restarts,
                    "last_exit": s.last_exit,
                    "since": s.since,
                    "message": s.message,
                    "placement": s.placement,
                    "vram_mib": s.vram_mib,
                    "tail": list(s.tail),
                }
                for name, s in servers.items()
            },
            "queued": queued,
            "launcher": {"kind": choice.kind, "reason": choice.reason},
            "agents_running": launcher.running,
            "agents": launcher.agents(),
            "outages": launcher.outages(),
        },
    )


STALE_SECONDS = 5 * HEARTBEAT_SECONDS
"""A heartbeat older than this: the daemon's process is there but not doing its job."""


def daemon_state(config: Config) -> tuple[str, dict[str, Any] | None]:
    """The daemon's state: "running", "not responding" (alive, heartbeat stale) or "not
    running"; and what it last published (None without a status file)."""
    try:
        published = json.loads(status_path(config).read_text())
    except (OSError, ValueError):
        return "not running", None
    if published["stopped"] or not _alive(published["pid"]):
        return "not running", published
    if time.time() - published["heartbeat"] >= STALE_SECONDS:
        return "not responding", published
    return "running", published


def collect(config: Config) -> dict[str, Any]:
    """The daemon's published state plus the ledger's view; `running` says if it is up and
    doing its job, `state` also tells a hung daemon ("not responding") from a stopped one."""
    state, published = daemon_state(config)
    report: dict[str, Any] = {"running": state == "running", "state": state, "servers": {},
                              "status": None}  # fmt: skip
    if published:
        report.update(
            pid=published["pid"], servers=published["servers"], status=published["status"],
            heartbeat=published["heartbeat"],
        )  # fmt: skip
    # What the daemon watches: only while it runs (a stopped one's list is history).
    current = published if published and state != "not running" else {}
    report["agents"] = current.get("agents", [])
    report["launcher"] = current.get("launcher")
    report["outages"] = current.get("outages", []) if report["agents"] else []
    for name in SERVER_NAMES:
        server = config.server(name)
        if not server.managed:  # someone else runs it: the daemon only knows where it is
            report["servers"][name] = {"state": "unmanaged", "url": server.url}
    ledger_path = config.daemon.ledger_path
    if not ledger_path.exists():
        empty: dict[str, Any] = {"escalations": [], "recent": [], "pipeline_runs": []}
        return report | empty | {"counts": {}, "attention": [], "cases": 0}
    try:
        ledger = Ledger(ledger_path, readonly=True)
        try:
            report["escalations"] = [_row(e) for e in ledger.in_state(State.ESCALATED)]
            # Rows mid-way past their deadline (what the sweep has not resumed or settled yet,
            # an escalation not yet recorded among them), and the latest failures.
            now = time.time()
            failed = ledger.in_state(State.FAILED, limit=ATTENTION)
            recent = [e for e in failed if e.updated > now - ATTENTION_SECONDS]
            stuck = ledger.stuck(now - config.daemon.transient_deadline_seconds)
            report["attention"] = [_row(e) for e in stuck + recent]
            report["recent"] = [_row(e) for e in ledger.recent(10)]
            report["pipeline_runs"] = [_row(e) for e in ledger.pipeline_runs()]
            report["counts"] = ledger.counts()
            report["cases"] = ledger.cases_mark()[0]
        finally:
            ledger.close()
    except sqlite3.Error as exc:
        raise DaemonError(f"status: cannot read the ledger {ledger_path}: {exc}") from None
    return report


def _row(entry: Any) -> dict[str, Any]:
    return {
        "file": entry.path,
        "run_id": entry.run_id,
        "pipeline_run": entry.root_run_id,
        "step": entry.step,
        "state": entry.state.value,
        "decision": entry.action,
        "agent": entry.agent,
        "exit_code": entry.exit_code,
        "reason": entry.reason,
        "updated": entry.updated,
        # Only a confidence fitted on labelled cases is shown as calibrated.
        "calibrated_confidence": (
            entry.decision.calibrated_confidence
            if entry.decision is not None and "calibrated_on" in entry.decision.signals
            else None
        ),
    }


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def render(report: dict[str, Any]) -> str:
    lines = []
    if report["running"]:
        lines.append(f"daemon: running (pid {report['pid']}) · {report['status']}")
    elif report["state"] == "not responding":
        age = time.time() - report["heartbeat"]
        lines.append(
            f"daemon: not responding since {_when(report['heartbeat'])} (pid {report['pid']},"
            f" no heartbeat for {age:.0f}s; see journalctl -u prng-llm-daemon)"
        )
    else:
        lines.append("daemon: not running")
    for name, s in report["servers"].items():
        if s["state"] == "unmanaged":
            lines.append(f"  {name}: not managed by the daemon, at {s['url']}")
            continue
        facts = [f"pid {s['pid']}"] if s["pid"] is not None else []
        facts.append(f"restarts {s['restarts']}")
        if s["last_exit"] is not None:
            facts.append(f"last exit: {exit_text(s['last_exit'])}")
        placed = where(s.get("placement"), s.get("vram_mib")) if s["state"] != "failed" else ""
        lines.append(
            f"  {name}: {s['state']}{' ' + placed if placed else ''} ({', '.join(facts)})"
            + (f" — {s['message']}" if s["message"] else "")
        )
        if s.get("tail"):
            lines.append("    its last lines:")
            lines.extend(f"    | {line}" for line in s["tail"])
    if report["launcher"]:
        lines.append(f"launcher: {report['launcher']['kind']} ({report['launcher']['reason']})")
    lines.append(f"agents running: {len(report['agents'])}")
    lines.extend(f"  {outage}: the states below are as last seen" for outage in report["outages"])
    for a in report["agents"]:
        runs_as = f"unit {a['unit']}" if a.get("unit") else f"pid {a['pid']}"
        if a.get("job_id"):
            runs_as = f"Slurm job {a['job_id']} {a['state'] or '?'} on {a['node'] or '-'}"
            if report["outages"] and a.get("seen"):
                runs_as += f" (as last seen at {clock(a['seen'])})"
        lines.append(f"  {a['run_id']}  {a['agent']}  {runs_as}")
    if report["agents"]:
        lines.append("  stop one with: prng-llm-daemon stop-agent RUN_ID")
    lines.append(f"pending escalations: {len(report['escalations'])}")
    for e in report["escalations"]:
        lines.append(f"  {e['run_id']}  step {e['step']}  {e['file']}: {e['reason']}")
    if report["escalations"]:
        lines.append("  resolve with: prng-llm-daemon approve RUN_ID [--retry] | reject RUN_ID")
    lines.append(f"stuck or failed: {len(report['attention'])}")
    for e in report["attention"]:
        stuck = e["state"] != State.FAILED
        what = f"{e['state']} for {time.time() - e['updated']:.0f}s" if stuck else "failed"
        plan = f" ({e['decision']})" if stuck and e["decision"] else ""
        lines.append(f"  {e['run_id'] or '-'}  step {e['step']}  {e['file']}: {what}{plan}"
                     + (f": {e['reason']}" if e["reason"] else ""))  # fmt: skip
    lines.append(
        f"labelled cases: {report['cases']} (add: prng-llm-daemon correct RUN_ID --should ACTION)"
    )
    lines.append("pipeline runs:")
    for e in report["pipeline_runs"]:
        lines.append(
            f"  {e['pipeline_run']}: step {e['step']}/6 {e['state']}"
            + (f" ({e['decision']} -> {e['agent']})" if e["agent"] else "")
        )
    lines.append("last decisions:")
    for e in report["recent"]:
        lines.append(
            f"  {_when(e['updated'])}  {e['file']}  {e['state']}"
            + (f"  {e['decision']}" if e["decision"] else "")
            + (f" (calibrated {c:.2f})" if (c := e["calibrated_confidence"]) is not None else "")
            + (f"  ({e['reason']})" if e["reason"] else "")
        )
    # File names, reasons and run ids come from files anyone could drop: no raw newline or
    # terminal escape from them reaches the screen.
    return "\n".join(printable(line) for line in lines)
