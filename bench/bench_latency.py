"""Event -> agent start latency: the daemon against the comparable floor (an `inotifywait -m`
loop feeding a bare client that asks the same fake LLM the same requests over a kept-alive
connection, then spawns the agent), `watchmedo shell-command` and a bare `inotifywait -m` bash
loop (no LLM at all), on the same events, with the same agent, in one run."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import (
    agents_section,
    build_agent,
    command_line,
    create_cost_us,
    end,
    marker_names,
    phase_table,
    read_marker,
    save,
    settle_disk,
    start_timed_daemon,
    summary_ms,
    table,
    wait_for,
)
from tests.fake_llama import FakeLlama
from tests.workspace import make_workspace, result_document, run_id, wait_ready

WARMUP = 3
GAP_SECONDS = 0.05
"""Pause after each launch before the next file: every tool settles (the daemon writes its
decision record, the agent exits) so each event meets an idle tool."""
LAUNCH_TIMEOUT = 10.0


class StampedLlama(FakeLlama):
    """A zero-latency FakeLlama that notes when each /v1/chat/completions that decides (not
    an explanation) is answered."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: list[int] = []

    def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = super()._chat(body)
        if not explains(body):
            self.answered.append(time.monotonic_ns())
        return answer


@dataclass
class Tool:
    name: str
    results: Path
    markers: Path
    proc: subprocess.Popen[bytes] | None = None
    latencies: list[float] = field(default_factory=list)
    to_llm: list[float] = field(default_factory=list)
    """File complete -> the fake answered the first request that decides (daemon only)."""
    from_llm: list[float] = field(default_factory=list)
    """The fake answered the last request that decides -> the agent started (daemon only)."""
    written: list[int] = field(default_factory=list)
    missed: int = 0


def inotifywait_loop(agent: list[str], results: Path, markers: Path) -> str:
    # The floor: the kernel event, one bash fork+exec of the agent in the background.
    quoted = " ".join(f"'{a}'" for a in agent)
    return (
        f"inotifywait -m -q -e close_write,moved_to --format '%f' '{results}' |"
        f' while IFS= read -r f; do case "$f" in .*) ;;'
        f" *.json) {quoted} '{markers}' \"$f\" & ;; esac; done"
    )


FLOOR = """\
import http.client, json, os, signal, sys
port, bodies, results, markers, *agent = sys.argv[1:]
asks = None  # read at the first event: written once the daemon's warm-up is done
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the agents
llm = http.client.HTTPConnection("127.0.0.1", int(port))
for line in sys.stdin:
    name = line.rstrip("\\n")
    if name.startswith(".") or not name.endswith(".json"):
        continue
    with open(os.path.join(results, name), "rb") as f:
        json.loads(f.read())
    if asks is None:
        asks = [(p, json.dumps(body).encode(), first) for p, body, first in json.load(open(bodies))]
    for path, body, _ in (a for a in asks if a[2]):
        llm.request("POST", path, body, {"Content-Type": "application/json"})
        json.loads(llm.getresponse().read())
    os.posix_spawn(agent[0], [*agent, markers, name], os.environ)
    for path, body, _ in (a for a in asks if not a[2]):
        llm.request("POST", path, body, {"Content-Type": "application/json"})
        json.loads(llm.getresponse().read())
"""
"""The comparable floor: read and parse the file, send the daemon's requests for one file
(recorded from its warm-up) over one kept-alive connection, parse each answer, spawn the agent;
as the daemon does, the requests that decide come before the spawn, the explanation after."""


def floor_loop(agent: list[str], tool: Tool, port: int, bodies: Path) -> str:
    script = tool.results.parent / "floor.py"
    script.write_text(FLOOR)
    args = (sys.executable, "-I", script, port, bodies, tool.results, tool.markers, *agent)
    return (
        f"inotifywait -m -q -e close_write,moved_to --format '%f' '{tool.results}' | "
        + " ".join(f"'{a}'" for a in args)
    )


def document(n: int) -> str:
    # Step 2's primary LLM is the math server alone: one /completion per decision.
    return json.dumps(result_document(2, run_id(2, n)))


ASKED_AT = "/v1/chat/completions"


def explains(body: dict[str, Any]) -> bool:
    """A request for a decision's explanation (its confidence word and reasoning), which the
    daemon sends alongside the launch rather than before it."""
    return "reasoning" in str(body.get("grammar", ""))


def drop_and_time(tool: Tool, n: int, text: str) -> int | None:
    """Write one result (temp file, rename), wait for its agent; record the latency.

    Returns when the file was complete (CLOCK_MONOTONIC ns), None if no agent started."""
    before = marker_names(tool.markers)
    tmp = tool.results / f".r{n:05d}.json.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, tool.results / f"r{n:05d}.json")
    written = time.monotonic_ns()
    new = wait_for(lambda: marker_names(tool.markers) - before, LAUNCH_TIMEOUT)
    if not new:
        tool.missed += 1
        return None
    started = max(read_marker(tool.markers / name)[0] for name in new)
    tool.latencies.append((started - written) / 1e9)
    tool.written.append(written)
    return written


FLOOR_NAME = "floor: inotifywait + kept-alive client"
BASELINES = (FLOOR_NAME, "watchmedo", "inotifywait (no LLM)")


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    agent, agent_kind = build_agent(tmp)
    with StampedLlama() as fake:
        ws = make_workspace(
            tmp / "daemon", fake.port, daemon={"rescan_interval_seconds": 30.0},
            agents=agents_section(agent, tmp / "daemon" / "markers"),
        )  # fmt: skip
        timers = tmp / "timers.json"
        daemon = Tool("prng-llm-daemon", ws.results, ws.markers)
        if args.profile:
            daemon.proc = start_timed_daemon(ws.config_path, timers, ws.root / "daemon.log")
        else:
            daemon.proc = ws.start()
        tools = [daemon]
        others = []
        for tree in args.against:
            # The same daemon from another checkout (the tree before a fix), interleaved.
            label = Path(tree).name
            other = make_workspace(
                tmp / f"against-{label}",
                fake.port,
                daemon={"rescan_interval_seconds": 30.0},
                agents=agents_section(agent, tmp / f"against-{label}" / "markers"),
            )
            tool = Tool(f"prng-llm-daemon @ {label}", other.results, other.markers)
            # PYTHONSAFEPATH: not this directory first on sys.path, the tree.
            tool.proc = other.start(env={"PYTHONPATH": tree, "PYTHONSAFEPATH": "1"})
            tools.append(tool)
            others.append(other)
        if not args.profile:
            for n, name in enumerate(BASELINES):
                (tmp / f"tool{n}" / "results").mkdir(parents=True)
                (tmp / f"tool{n}" / "markers").mkdir()
                tools.append(Tool(name, tmp / f"tool{n}" / "results", tmp / f"tool{n}" / "markers"))
        skipped: dict[str, str] = {}
        bodies = tmp / "bodies.json"
        try:
            for each in (ws, *others):
                wait_ready(each, 60)
            for tool in tools[1 + len(others) :]:
                tool.proc = start_baseline(tool, agent, skipped, fake.port, bodies)
            tools = [t for t in tools if t.name not in skipped]
            for tool in tools:  # the daemon first: its requests are what the floor sends
                # Also the readiness check of the baselines: their first events come back.
                for n in range(WARMUP):
                    asked = len(fake.requests)
                    drop_and_time(tool, n, document(n))
                    time.sleep(GAP_SECONDS)
                if tool.missed:
                    raise SystemExit(f"{tool.name}: no agent launched for the warm-up files")
                if tool is daemon:  # what the floor asks for each file: the daemon's requests
                    asks = [[ASKED_AT, body, not explains(body)] for body in fake.requests[asked:]]
                    bodies.write_text(json.dumps(asks))
                tool.latencies.clear()
                tool.written.clear()
            disk = settle_disk(tmp) if args.settle else {}
            # Interleaved, so that load from elsewhere on the machine hits every tool alike.
            for i in range(WARMUP, WARMUP + args.files):
                text = document(i)
                for tool in tools:
                    asked = len(fake.answered)
                    written = drop_and_time(tool, i, text)
                    if tool is daemon and written and len(fake.answered) > asked:
                        started = written + round(daemon.latencies[-1] * 1e9)
                        daemon.to_llm.append((fake.answered[asked] - written) / 1e9)
                        daemon.from_llm.append((started - fake.answered[-1]) / 1e9)
                    time.sleep(GAP_SECONDS)
            disk["create_us_after"] = create_cost_us(tmp / ".create-probe")
        finally:
            for tool in tools:
                if tool.proc is not None:
                    end_tool(tool.proc)
        requests = len(fake.requests)
        round_trip = http_round_trip(fake, tmp)
    result = {"agent": agent_kind, "tools": tools, "skipped": skipped, "requests": requests,
              "round_trip": round_trip, "asks": len(json.loads(bodies.read_text())),
              "disk": disk}  # fmt: skip
    if args.profile:
        result["timers"] = json.loads(timers.read_text())
    return result


ROUND_TRIP = """\
import asyncio, http.client, json, sys, time
from prng_daemon.llm.client import LlamaClient
url, body, n = sys.argv[1], json.loads(open(sys.argv[2]).read()), int(sys.argv[3])
bare = http.client.HTTPConnection(url.removeprefix("http://"))
spent = {"http.client": [], "LlamaClient.chat": []}
for _ in range(n):
    start = time.perf_counter()
    bare.request("POST", "/v1/chat/completions", json.dumps(body).encode())
    json.loads(bare.getresponse().read())
    spent["http.client"].append(time.perf_counter() - start)
async def ours():
    client = LlamaClient(url, timeout=60)
    for _ in range(n):
        start = time.perf_counter()
        await client.chat(body["messages"], n_predict=body["max_tokens"],
            temperature=body["temperature"], seed=body.get("seed"), grammar=body.get("grammar"),
            n_probs=body.get("top_logprobs", 0))
        spent["LlamaClient.chat"].append(time.perf_counter() - start)
    await client.aclose()
asyncio.run(ours())
print(json.dumps(spent))
"""


def http_round_trip(fake: FakeLlama, tmp: Path, n: int = 100) -> dict[str, list[float]]:
    """The daemon's first request for a file sent again, n times over one kept-alive
    connection, from a bare http.client and from the daemon's own async client: what the HTTP
    exchange with the fake costs each."""
    body = tmp / "body.json"
    body.write_text(json.dumps(json.loads((tmp / "bodies.json").read_text())[0][1]))
    out = subprocess.run([sys.executable, "-c", ROUND_TRIP, fake.url, str(body), str(n)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    spent: dict[str, list[float]] = json.loads(out)
    return spent


def start_baseline(
    tool: Tool, agent: list[str], skipped: dict[str, str], port: int, bodies: Path
) -> Any:
    if tool.name == "watchmedo":
        watchmedo = Path(sys.executable).parent / "watchmedo"
        if not watchmedo.exists():
            skipped[tool.name] = f"{watchmedo} not found"
            return None
        quoted = " ".join(f"'{a}'" for a in agent)
        command = f"{quoted} '{tool.markers}' \"${{watch_dest_path}}\""
        argv = [str(watchmedo), "shell-command", "--patterns=**/*.json", f"--command={command}",
                str(tool.results)]  # fmt: skip
        return subprocess.Popen(argv, start_new_session=True)
    if shutil.which("inotifywait") is None:
        skipped[tool.name] = "inotifywait not installed (apt-get install inotify-tools)"
        return None
    if tool.name == FLOOR_NAME:
        loop = floor_loop(agent, tool, port, bodies)
    else:
        loop = inotifywait_loop(agent, tool.results, tool.markers)
    return subprocess.Popen(["bash", "-c", loop], start_new_session=True)


def end_tool(proc: subprocess.Popen[bytes]) -> None:
    # The baselines run as process groups (bash pipeline, watchmedo's shells): end them all.
    if proc.args[0] == sys.executable:  # type: ignore[index]
        end(proc, 60)
        return
    try:
        os.killpg(proc.pid, 15)
    except ProcessLookupError:
        pass
    proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=200, help="events per tool (default 200)")
    parser.add_argument(
        "--profile", action="store_true", help="the daemon alone, under cProfile: where time goes"
    )
    parser.add_argument(
        "--against", action="append", default=[], metavar="TREE",
        help="also the daemon from this tree (e.g. `git archive` of the commit before a fix, in"
        " a directory named after it), files interleaved with the others: before/after in one run",
    )  # fmt: skip
    parser.add_argument(
        "--no-settle", dest="settle", action="store_false",
        help="start timing at once, without waiting until creating a file costs what it does on"
        " a quiet disk (see bench/_common.py settle_disk)",
    )  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        result = measure(args, Path(tmp))
    tools: list[Tool] = result["tools"]
    stats = {t.name: summary_ms(t.latencies) for t in tools if t.latencies}
    floor = stats.get(FLOOR_NAME)
    watchmedo = stats.get("watchmedo")

    def ratio(s: dict[str, float], base: dict[str, float] | None, key: str) -> str:
        return f"{s[key] / base[key]:.2f}x" if base else "-"

    rows = []
    for t in tools:
        s = stats[t.name]
        rows.append([
            t.name, s["n"], t.missed, s["median_ms"], s["p99_ms"], s["max_ms"],
            ratio(s, floor, "median_ms"), ratio(s, floor, "p99_ms"),
            ratio(s, watchmedo, "median_ms"),
        ])  # fmt: skip
    headers = ["tool", "files", "missed", "median ms", "p99 ms", "max ms",
               "median / floor", "p99 / floor", "median / watchmedo"]  # fmt: skip
    title = f"Event -> agent start latency ({args.files} sequential files per tool)"
    tables = {title: table(headers, rows)}
    daemon = tools[0]
    if daemon.to_llm and len(daemon.to_llm) == len(daemon.latencies):
        to_llm, after = summary_ms(daemon.to_llm), summary_ms(daemon.from_llm)
        stats["daemon_event_to_llm"], stats["daemon_llm_to_agent"] = to_llm, after
        tables["Where the daemon's latency goes"] = table(
            ["phase", "median ms", "p99 ms", "max ms"],
            [
                ["file complete -> fake answers the finding (watch, validate, ledger, prompt,"
                 " HTTP)", to_llm["median_ms"], to_llm["p99_ms"], to_llm["max_ms"]],
                ["finding answered -> agent running (parse, ledger, params file, spawn, exec)",
                 after["median_ms"], after["p99_ms"], after["max_ms"]],
            ],
        )  # fmt: skip
    notes = [
        f"agent: {result['agent']}; zero-latency fake LLM, HTTP/1.1 keep-alive"
        f" ({result['requests']} requests, {result['asks']} per file);",
        f"files interleaved across tools, {GAP_SECONDS * 1000:.0f} ms pause after each launch",
    ]
    disk = result["disk"]
    notes.append(
        f"one file create: {disk['create_us_first']} µs at first, {disk['create_us']} µs after"
        f" waiting {disk['waited_s']} s for the disk to settle, {disk['create_us_after']} µs"
        " at the end"
        if args.settle
        else f"one file create at the end: {disk['create_us_after']} µs (--no-settle)"
    )
    notes += [f"{name} skipped: {why}" for name, why in result["skipped"].items()]
    profile: dict[str, Any] = {}
    if "timers" in result:
        # Drop the warm-up files' share of calls: they carry first-use costs (lazy imports).
        total = args.files + WARMUP
        timings = {
            k: v[round(len(v) * WARMUP / total) :] for k, v in result["timers"]["timings"].items()
        }
        text, profile = phase_table(timings, args.files)
        tables["Daemon phases, perf_counter around its functions"] = text
        entered = result["timers"]["entered_ns"][WARMUP:]
        if len(entered) == len(daemon.written):
            hop = summary_ms([(e - w) / 1e9 for e, w in zip(entered, daemon.written, strict=True)])
            profile["file complete -> Engine.process entered"] = hop
            notes.append(f"file complete -> Engine.process entered: median {hop['median_ms']} ms,"
                         f" p99 {hop['p99_ms']} ms (watchdog thread + asyncio queue)")  # fmt: skip
    for client, spent in result["round_trip"].items():
        trip = stats[f"round_trip_{client}"] = summary_ms(spent)
        notes.append(f"the daemon's first request for a file again, kept-alive, from {client}:"
                     f" median {trip['median_ms']} ms, p99 {trip['p99_ms']} ms")  # fmt: skip
    print("\n".join(notes))
    save(
        "latency_profile" if args.profile else "latency",
        command_line(),
        tables,
        {"notes": notes, "stats": stats, "profile": profile, "disk": disk,
         "latencies_ms": {t.name: [round(x * 1000, 3) for x in t.latencies] for t in tools}},
    )  # fmt: skip


if __name__ == "__main__":
    main()
