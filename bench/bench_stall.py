"""Longest event-loop stall while the daemon takes in five huge result files.

The real daemon (`prng-llm-daemon run`, with bench/_common.py's lag probe: a task sleeping
10 ms in a loop and recording how late it wakes) gets five 15 MB files at once, and the
longest stall is what the unit's WatchdogSec=30s would see. Two sets:

- "200,000 inputs": five files with 200,000 `inputs` entries each, as in issue 12 (case 7);
- "valid, 15 MB": five files within every limit (10,000 inputs) whose payload fills 15 MB,
  so they are decided and launched: the path a legitimate big result takes.

Usage: .venv/bin/python -m bench.bench_stall [--timeout S]. To measure a tree without the fix,
copy this file into that tree's bench/ and run it there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import command_line, end, percentile, save, start_timed_daemon, table, wait_for
from tests.fake_llama import FakeLlama
from tests.workspace import make_workspace, ready, result_document, run_id

FILES = 5
TARGET_BYTES = 15_000_000
SETS = {"200,000 inputs": 200_000, "valid, 15 MB": 10_000}
"""Set name -> `inputs` entries per file; the payload pads each file to TARGET_BYTES."""


def document(n: int, inputs: int) -> bytes:
    entries = [
        {"file": f"inputs/part_{i:06d}.bin", "hash": "sha256:0123456789ab"} for i in range(inputs)
    ]
    doc: dict[str, Any] = result_document(2, run_id(2, n), inputs=entries)
    body = json.dumps(doc).encode()
    # Survivor counts as a flat list of numbers: cheap to parse, walked once by the depth check.
    room = max(0, TARGET_BYTES - len(body))
    doc["payload"]["survivor_counts"] = [123456] * (room // 8)
    return json.dumps(doc).encode()


def measure(name: str, inputs: int, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-stall-") as tmp, FakeLlama() as fake:
        ws = make_workspace(Path(tmp), fake.port)
        # Written in full before the daemon starts, hidden (".tmp"): only the renames are timed.
        staged = []
        for n in range(FILES):
            data = document(n, inputs)
            hidden = ws.results / f".big{n}.json.tmp"
            hidden.write_bytes(data)
            staged.append((hidden, ws.results / f"big{n}.json", len(data)))
        out = Path(tmp) / "timings.json"
        proc = start_timed_daemon(ws.config_path, out, ws.root / "daemon.log")
        try:
            if not wait_for(lambda: ready(ws), 60, 0.05):
                sys.exit(f"{name}: the daemon did not start; see {ws.root / 'daemon.log'}")
            started = time.monotonic()
            for hidden, final, _ in staged:
                os.replace(hidden, final)
            settled = wait_for(lambda: ws.finished(FILES), timeout, 0.1)
            seconds = time.monotonic() - started
            states = ws.ledger_states()
        finally:
            code = end(proc, timeout=120)
        lag_ms = [x * 1000 for x in json.loads(out.read_text())["lag"]]
    return {
        "set": name,
        "files": FILES,
        "bytes_per_file": staged[0][2],
        "inputs_per_file": inputs,
        "settled": bool(settled),
        "seconds_to_settle": round(seconds, 2),
        "ledger": states,
        "exit_code": code,
        "samples": len(lag_ms),
        "longest_stall_ms": round(max(lag_ms), 1),
        "p99_stall_ms": round(percentile(lag_ms, 99), 1),
        "stalls_over_250ms": sum(1 for x in lag_ms if x > 250),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per set")
    args = parser.parse_args()
    rows = [measure(name, inputs, args.timeout) for name, inputs in SETS.items()]
    headers = ["set", "files x MB", "ledger", "s to settle", "longest stall ms", "p99 ms",
               "stalls > 250 ms"]  # fmt: skip
    cells = [
        [
            r["set"],
            f"{r['files']} x {r['bytes_per_file'] / 1e6:.1f}",
            ", ".join(f"{k}={v}" for k, v in sorted(r["ledger"].items())),
            r["seconds_to_settle"],
            r["longest_stall_ms"],
            r["p99_stall_ms"],
            r["stalls_over_250ms"],
        ]
        for r in rows
    ]
    title = "Event-loop stalls, five huge result files at once (10 ms lag probe)"
    save("stall", command_line(), {title: table(headers, cells)}, {"sets": rows})


if __name__ == "__main__":
    main()
