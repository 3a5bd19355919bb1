"""Shared benchmark plumbing: a timing agent, tables, JSON.

The scripts run as modules from the repository root (`.venv/bin/python -m bench.bench_latency`),
so the test helpers (`tests.workspace`, `tests.fake_llama`) import as they do in the tests.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prng_daemon.llm.router import AsyncRouter, Routed
from tests import fake_llama

REPO = Path(__file__).resolve().parent.parent

# The configs the benchmarks build with `fake_llama.llm_config` keep their state (llm.key) in a
# directory of the run's own, as conftest gives the tests one: never the machine's
# /var/lib/prng-llm-daemon.
fake_llama.STATE_DIR = Path(tempfile.mkdtemp(prefix="prng-bench-state-"))
atexit.register(shutil.rmtree, fake_llama.STATE_DIR, True)

RESULTS_DIR = REPO / "bench" / "results"

# The agent every benchmark launches. It reads CLOCK_MONOTONIC first thing, then writes one
# marker `<key>-<pid>` holding "<monotonic ns> <result file>", where key is $PRNG_LAUNCH_ID when
# the daemon launched it, else the result file's name. Written in C so that what is measured is
# the launcher, not an interpreter's start-up; Python is the fallback where no C compiler exists.
AGENT_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    if (argc < 3) return 2;
    const char *base = strrchr(argv[2], '/');
    const char *key = getenv("PRNG_LAUNCH_ID");
    char tmp[4096], path[4096];
    if (!key) key = base ? base + 1 : argv[2];
    snprintf(path, sizeof path, "%s/%s-%d", argv[1], key, (int)getpid());
    snprintf(tmp, sizeof tmp, "%s/.%d.tmp", argv[1], (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return 1;
    fprintf(f, "%lld %s\n", (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec, argv[2]);
    if (fclose(f)) return 1;
    return rename(tmp, path) ? 1 : 0;
}
"""

AGENT_PY = """\
import time
now = time.monotonic_ns()
import os, sys
base = os.path.basename(sys.argv[2])
key = os.environ.get("PRNG_LAUNCH_ID", base)
tmp = os.path.join(sys.argv[1], "." + str(os.getpid()) + ".tmp")
with open(tmp, "w") as f:
    f.write(str(now) + " " + sys.argv[2] + "\\n")
os.rename(tmp, os.path.join(sys.argv[1], key + "-" + str(os.getpid())))
"""


def build_agent(workdir: Path) -> tuple[list[str], str]:
    """argv prefix of the timing agent (append MARKERS_DIR RESULT_FILE) and what it is."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is not None:
        source = workdir / "agent.c"
        binary = workdir / "agent"
        source.write_text(AGENT_C)
        subprocess.run([cc, "-O2", "-o", str(binary), str(source)], check=True)
        return [str(binary)], "C (clock_gettime at main)"
    script = workdir / "agent.py"
    script.write_text(AGENT_PY)
    return [sys.executable, "-I", "-S", str(script)], "python -I -S (no C compiler found)"


def agents_section(agent: Sequence[str], markers: Path) -> dict[str, Any]:
    """The config `agents` section: every pipeline agent is the timing agent."""
    from prng_daemon.document.pipeline import PIPELINE

    names = {s.agent for s in PIPELINE} | {s.follow_up_agent for s in PIPELINE}
    return {
        name: {"argv": [*agent, str(markers), "{result_file}"], "timeout_seconds": 60}
        for name in names
        if name != "none"
    }


def read_markers(markers: Path) -> dict[str, tuple[int, str]]:
    """marker name -> (agent start in CLOCK_MONOTONIC ns, the result file it was given)."""
    return {name: read_marker(markers / name) for name in marker_names(markers)}


def marker_names(markers: Path) -> set[str]:
    """The markers written so far: one directory listing, no file opened. What a poll reads,
    cheaply: the fake LLM shares this process's GIL, and reading every marker each poll (1.7 ms
    with 200 of them) held it up while it answered the tool being timed."""
    return {name for name in os.listdir(markers) if not name.startswith(".")}


def read_marker(path: Path) -> tuple[int, str]:
    """(agent start in CLOCK_MONOTONIC ns, the result file it was given) of one marker."""
    with open(path) as f:
        stamp, result = f.read().split(" ", 1)
    return int(stamp), result.strip()


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.002) -> Any:
    """Poll until `predicate()` is truthy; None at the deadline (benchmarks record, not fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


QUIET_CREATE_US = 50.0
"""A file create costs ~5 µs here on a quiet disk; over this, the disk is not quiet."""


def create_cost_us(directory: Path, n: int = 20) -> float:
    """Median µs to create (and close) one empty file in `directory`. The files stay (they go
    with the benchmark's directory): unlinking them would itself make the next creates slow."""
    directory.mkdir(exist_ok=True)
    start = len(os.listdir(directory))
    spent = []
    for i in range(start, start + n):
        began = time.perf_counter_ns()
        os.close(os.open(directory / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        spent.append((time.perf_counter_ns() - began) / 1e3)
    return round(percentile(spent, 50), 1)


def settle_disk(directory: Path, timeout: float = 90.0) -> dict[str, float]:
    """Wait until creating a file in `directory` costs what it does on a quiet disk; what it
    cost at first and when the wait ended, and how long that took.

    On a journal-less ext4 (this VM's root), for ~35 s after many files were deleted (the last
    run's temporary directory, a test suite), each new inode costs a scan past the recently
    deleted ones (ext4's `recently_deleted()`): 0.26-0.29 ms a create instead of 5 µs. The daemon
    creates three files before its agent runs, the bare tools none: measured in that state, a
    run times the disk's recent history more than the tools.
    """
    probe = directory / ".create-probe"
    first = now = create_cost_us(probe)
    began = time.monotonic()
    while now > QUIET_CREATE_US and time.monotonic() - began < timeout:
        time.sleep(1.0)
        now = create_cost_us(probe)
    waited = round(time.monotonic() - began, 1)
    return {"create_us_first": first, "create_us": now, "waited_s": waited}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "median_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(max(ms), 3),
        "min_ms": round(min(ms), 3),
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, columns padded so it also reads well on a terminal."""
    text = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in text]  # fmt: skip
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def machine() -> dict[str, Any]:
    """Where and when the numbers were taken (the load matters on a shared 2-core machine)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
    }


def save(name: str, command: str, tables: dict[str, str], data: dict[str, Any]) -> Path:
    """Print the tables, write bench/results/<name>.json, return its path."""
    for title, text in tables.items():
        print(f"\n### {title}\n\n{text}")
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {"bench": name, "command": command, "machine": machine(), "tables": tables, **data}
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwritten: {path.relative_to(REPO)}")
    return path


def proc_usage(pid: int) -> tuple[int, float]:
    """(VmRSS in KiB, utime+stime in seconds) of a live process, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return rss, ticks / os.sysconf("SC_CLK_TCK")


def end(proc: subprocess.Popen[Any], timeout: float = 30.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def start_server(
    binary: str, model: Path, port: int, log: Path, *, threads: int, slots: int
) -> subprocess.Popen[bytes]:
    """A llama-server on loopback `port`, ready (its /health 200) when this returns; 8192 tokens
    of context per slot (the tiny model's tokens are bytes: a decision prompt is ~4,500)."""
    import httpx

    argv = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c",
            str(8192 * slots), "-np", str(slots), "-t", str(threads), "--no-webui"]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out)

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_for(healthy, 300, interval=0.05):
        end(proc)
        raise SystemExit(f"llama-server did not become ready; see {log}")
    return proc


def command_line() -> str:
    """How this run was started, as a person types it from the repository root."""
    module = Path(sys.argv[0]).resolve().relative_to(REPO).with_suffix("")
    return " ".join([".venv/bin/python", "-m", ".".join(module.parts), *sys.argv[1:]])


# -- the daemon with phase timers: where its time goes, without editing it -------------------

PHASES = {
    # label: (module, attribute path) of what is wrapped; coroutines are timed to completion.
    "engine.process (whole file)": ("prng_daemon.engine", "Engine.process"),
    "load_result (read, hash, JSON, schema, pydantic)": ("prng_daemon.engine", "load_result"),
    "Engine.load (load_result, a worker thread for big files)": (
        "prng_daemon.engine",
        "Engine.load",
    ),
    "ledger.claim": ("prng_daemon.ledger", "Ledger.claim"),
    "ledger.update": ("prng_daemon.ledger", "Ledger.update"),
    "ledger.root_of": ("prng_daemon.ledger", "Ledger.root_of"),
    "LLM slot wait + decide": ("prng_daemon.daemon", "Daemon._decide"),
    "decide (prompt + HTTP + checks)": ("prng_daemon.handlers.decide.policy", "Decider.take"),
    "explain (after the launch)": ("prng_daemon.handlers.decide.policy", "Decider.explain"),
    "HTTP chat (client, answer parsed)": ("prng_daemon.llm.client", "LlamaClient.chat"),
    "write_json_atomic (params)": ("prng_daemon.handlers.act.plan", "write_json_atomic"),
    "write_json_atomic (record)": ("prng_daemon.handlers.record", "write_json_atomic"),
    "launcher.start (posix_spawn until exec)": (
        "prng_daemon.handlers.act.local",
        "LocalLauncher.start",
    ),
    "structlog (render + write a line)": ("structlog._base", "BoundLoggerBase._proxy_to_logger"),
}


LAG_PROBE_SECONDS = 0.01


def run_timed_daemon(config: str, out: str, fsync: bool = True) -> int:
    """`prng-llm-daemon run` with PHASES wrapped in perf_counter timers; they go to `out`.

    Also samples event-loop lag (how late a 10 ms sleep wakes up: time the loop was blocked).
    fsync=False makes os.fsync a no-op: a what-if for the lead, never a measurement of record.
    """
    import asyncio
    import functools
    import importlib

    from prng_daemon.daemon import Daemon

    timings: dict[str, list[float]] = {label: [] for label in PHASES}
    entered: list[int] = []
    lag: list[float] = []
    if not fsync:
        os.fsync = lambda fd: None

    async def probe_lag() -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(LAG_PROBE_SECONDS)
            lag.append(time.perf_counter() - start - LAG_PROBE_SECONDS)

    original_run = Daemon.run

    async def run_with_probe(self: Daemon) -> int:
        task = asyncio.get_running_loop().create_task(probe_lag())
        try:
            return await original_run(self)
        finally:
            task.cancel()

    Daemon.run = run_with_probe  # type: ignore[method-assign]

    def wrap(label: str, original: Any) -> Any:
        spent = timings[label]
        if asyncio.iscoroutinefunction(original):

            @functools.wraps(original)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                if label.startswith("engine.process"):
                    entered.append(time.monotonic_ns())
                start = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    spent.append(time.perf_counter() - start)

            return timed_async

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - start)

        return timed

    for label, (module_name, attribute) in PHASES.items():
        owner: Any = importlib.import_module(module_name)
        *parents, name = attribute.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        setattr(owner, name, wrap(label, getattr(owner, name)))

    from prng_daemon.cli import main

    code = main(["run", "--config", config])
    Path(out).write_text(json.dumps({"timings": timings, "entered_ns": entered, "lag": lag}))
    return code


def start_timed_daemon(
    config: Path, out: Path, log: Path, fsync: bool = True
) -> subprocess.Popen[bytes]:
    code = (
        "import sys; from bench import _common; "
        f"sys.exit(_common.run_timed_daemon({str(config)!r}, {str(out)!r}, {fsync!r}))"
    )
    with open(log, "ab") as stream:
        return subprocess.Popen(
            [sys.executable, "-c", code], stdout=stream, stderr=stream, cwd=REPO
        )


def phase_table(timings: dict[str, list[float]], files: int) -> tuple[str, dict[str, Any]]:
    """Per-file cost of each phase: calls per file, median per call, total per file."""
    rows, data = [], {}
    for label, spent in timings.items():
        if not spent:
            continue
        per_file = sum(spent) / files * 1000
        median = percentile(spent, 50) * 1000
        data[label] = {"calls": len(spent), "median_ms": median, "per_file_ms": per_file}
        rows.append([label, f"{len(spent) / files:.1f}", f"{median:.3f}", f"{per_file:.3f}"])
    headers = ["phase (wrapped function)", "calls per file", "median ms per call", "ms per file"]
    return table(headers, rows), data


class RecordingRouter(AsyncRouter):
    """The daemon's router, keeping every answered request for the token and call counts."""

    calls: list[Routed]

    async def chat(self, messages: Sequence[dict[str, str]], **kwargs: Any) -> Routed:
        routed = await super().chat(messages, **kwargs)
        self.calls.append(routed)
        return routed
