"""What one log event costs the event loop: a JSON line to a file, the native journal entry
(sentence + fields, one datagram), and the `<N>`-prefixed JSON fallback when the socket is gone.

The journal stands in as an AF_UNIX datagram socket bound in a temp dir and drained by another
process, as journald reads its socket in its own process. An entry the socket did not take goes
to the fallback stream: the table counts those. Each event
is `decision.made` with the engine's bound context, logged through the configured structlog chain:
a burst (events back to back: the journal's queue can fill) and paced (1 ms apart, as a daemon
logs: a few events per file).

Usage: .venv/bin/python -m bench.bench_journal [--events N]
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from bench._common import command_line, percentile, save, table
from prng_daemon.log import configure_logging


def per_event_us(events: int, gap: float = 0.0) -> list[float]:
    """Microseconds per event, one sample per event, `gap` seconds of sleep between events."""
    log = structlog.get_logger().bind(file="r3.json", run_id="step3_20251201_143022_abc123", step=3)
    samples = []
    for _ in range(events):
        start = time.perf_counter_ns()
        log.info("decision.made", decision="proceed", path="llm", confidence=0.82,
                 calibrated_confidence=0.79)  # fmt: skip
        samples.append((time.perf_counter_ns() - start) / 1000)
        if gap:
            time.sleep(gap)
    return samples


PACES = (("burst", 0.0), ("1 ms apart", 0.001))

# The stand-in journald: binds the socket, then reads datagrams until killed.
DRAIN = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(sys.argv[1])
while True:
    sock.recv(65536)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    rows: list[list[Any]] = []
    data: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as devnull:
        path = Path(tmp) / "journal.socket"
        journald = subprocess.Popen([sys.executable, "-c", DRAIN, str(path)])
        fallback = io.StringIO()
        ways = {
            "JSON line (a file, no journal)": lambda: configure_logging("json", stream=devnull),
            "native journal entry (sentence + fields)": lambda: configure_logging(
                "journal", stream=fallback, journal_socket=path
            ),
            "fallback: <N>JSON line (no socket)": lambda: configure_logging(
                "journal", stream=devnull, journal_socket=Path(tmp) / "missing"
            ),
        }
        try:
            deadline = time.monotonic() + 10
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            for (name, configure), (pace, gap) in itertools.product(ways.items(), PACES):
                configure()
                per_event_us(1000)  # warm-up
                fallback.seek(0)
                fallback.truncate()
                us = per_event_us(args.events if not gap else args.events // 10, gap)
                stats = {
                    "median_us": percentile(us, 50),
                    "p99_us": percentile(us, 99),
                    "fell_back": fallback.getvalue().count("\n"),
                    "events": len(us),
                }
                row = [name, pace, stats["median_us"], stats["p99_us"], stats["fell_back"]]
                rows.append(row)
                data[f"{name}, {pace}"] = stats
        finally:
            journald.kill()
            journald.wait()
    configure_logging("json")
    headers = ["way", "events", "median µs/event", "p99 µs/event", "sent to the fallback"]
    save("journal", command_line(), {"one log event": table(headers, rows)}, {"results": data})


if __name__ == "__main__":
    main()
