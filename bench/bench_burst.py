"""Burst throughput: 1,000 result files dropped at once against a fake LLM with latency L and
S slots; files per second against the S/L limit, and exactly-once counted from the launches."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import (
    agents_section,
    build_agent,
    command_line,
    marker_names,
    phase_table,
    read_markers,
    save,
    start_timed_daemon,
    summary_ms,
    table,
    wait_for,
)
from tests.fake_llama import FakeLlama
from tests.workspace import drop, make_workspace, result_document, run_id, stop, wait_ready

STEPS = (1, 2, 3, 4, 5)
"""Steps 1-5 in turn: each decision launches an agent (step 6 ends the pipeline run). Steps 3
and 5 ask both LLMs (math, then orchestrator): 1.4 requests per file on average."""


def burst(
    tmp: Path,
    files: int,
    latency: float,
    slots: int,
    timed: bool,
    fsync: bool = True,
    daemon_slots: int | None = None,
) -> dict[str, Any]:
    agent, _ = build_agent(tmp)
    with FakeLlama() as fake:
        fake.latency, fake.slots = latency, slots
        # The daemon's LLM semaphore is orchestrator.parallel + math.parallel: together S.
        total = daemon_slots or slots
        ws = make_workspace(
            tmp / "ws", fake.port,
            orchestrator={"parallel": total - total // 2}, math={"parallel": total // 2},
            daemon={"rescan_interval_seconds": 30.0},  # the default; the workspace's is 1 s
            agents=agents_section(agent, tmp / "ws" / "markers"),
        )  # fmt: skip
        timers = tmp / "timers.json"
        proc = (
            start_timed_daemon(ws.config_path, timers, ws.root / "daemon.log", fsync)
            if timed
            else ws.start()
        )
        try:
            wait_ready(ws, 60)
            documents = [result_document(s, run_id(s, n)) for n, s in enumerate(_steps(files))]
            began = time.monotonic_ns()
            for n, doc in enumerate(documents):
                drop(ws.results, f"b{n:05d}.json", doc)
            dropped = time.monotonic_ns()
            done = wait_for(lambda: ws.finished(files), 240, interval=0.2)
            wait_for(lambda: len(marker_names(ws.markers)) >= files, 30, interval=0.1)
            settled = time.monotonic_ns()
        finally:
            code = stop(proc, 60)
        markers = read_markers(ws.markers)
        requests = len(fake.requests)
        bare = bare_client_rate(fake, tmp, total, requests) if latency else None
    last = max((stamp for stamp, _ in markers.values()), default=settled)
    elapsed = (last - began) / 1e9
    per_file = requests / files
    limit = slots / latency / per_file if latency else None
    rate = files / elapsed
    launch_ids = {name.split("-")[0] for name in markers}
    result_files = [result for _, result in markers.values()]
    out: dict[str, Any] = {
        "L_s": latency, "S": slots, "daemon_slots": total, "files": files,
        "all_settled": bool(done),
        "drop_s": round((dropped - began) / 1e9, 3), "elapsed_s": round(elapsed, 3),
        "files_per_s": round(rate, 2), "requests": requests,
        "requests_per_file": round(per_file, 3),
        "limit_files_per_s": round(limit, 2) if limit else None,
        "ratio": round(rate / limit, 3) if limit else None,
        "launches": len(markers), "distinct_launch_ids": len(launch_ids),
        "distinct_result_files": len(set(result_files)),
        "ledger": ws.ledger_states(), "daemon_exit": code,
        "bare_client_req_per_s": bare,
        "bare_client_files_per_s": round(bare / per_file, 2) if bare else None,
    }  # fmt: skip
    if timed:
        recorded = json.loads(timers.read_text())
        out["timings"] = recorded["timings"]
        out["loop_lag"] = summary_ms(recorded["lag"])
    return out


BARE_CLIENT = """\
import asyncio, json, sys, time
from prng_daemon.llm.client import LlamaClient
body = json.loads(open(sys.argv[2]).read())
workers, total = int(sys.argv[3]), int(sys.argv[4])
async def worker(client, n):
    for _ in range(n):
        await client.chat(body["messages"], n_predict=body["max_tokens"],
            temperature=body["temperature"], seed=body.get("seed"), grammar=body.get("grammar"),
            n_probs=body.get("top_logprobs", 0))
async def main():
    client = LlamaClient(sys.argv[1], timeout=60)
    start = time.perf_counter()
    await asyncio.gather(*(worker(client, total // workers) for _ in range(workers)))
    print(total // workers * workers / (time.perf_counter() - start))
    await client.aclose()
asyncio.run(main())
"""


def bare_client_rate(fake: FakeLlama, tmp: Path, workers: int, requests: int) -> float:
    """Requests/s that S bare LlamaClient loops get from the same fake: the attainable ceiling
    of this fake + httpx on this machine, with no daemon in between."""
    body = tmp / "body.json"
    body.write_text(json.dumps(fake.requests[-1]))
    out = subprocess.run(
        [sys.executable, "-c", BARE_CLIENT, fake.url, str(body), str(workers), str(requests)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return round(float(out), 2)


def _steps(files: int) -> list[int]:
    return [STEPS[n % len(STEPS)] for n in range(files)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--profile", action="store_true",
                        help="also time the daemon's phases in the L=0 run")  # fmt: skip
    parser.add_argument("--case", nargs=2, type=float, metavar=("L", "S"),
                        help="run only this latency and slot count")  # fmt: skip
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="what-if: the timed daemon with os.fsync a no-op (with --profile)",
    )
    parser.add_argument(
        "--daemon-slots",
        type=int,
        help="what-if: the daemon's parallel total differs from the fake's S",
    )
    args = parser.parse_args()
    # (L, S): the LLM-bound case the issue asks for, a wider one, and L=0 (the daemon alone).
    cases = [(0.05, 4), (0.05, 8), (0.0, 4)]
    if args.case:
        cases = [(args.case[0], int(args.case[1]))]
    runs = []
    for latency, slots in cases:
        with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp:
            timed = args.profile and (latency == 0 or len(cases) == 1)
            runs.append(burst(Path(tmp), args.files, latency, slots, timed, not args.no_fsync,
                              args.daemon_slots))  # fmt: skip
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "timings"}))
    rows = [
        [
            r["L_s"], r["S"], r["files"], r["elapsed_s"], r["files_per_s"],
            r["requests"], r["limit_files_per_s"] or "-",
            f"{r['ratio']:.2f}" if r["ratio"] else "-",
            r["bare_client_files_per_s"] or "-",
            r["launches"], r["distinct_launch_ids"], r["distinct_result_files"],
            " ".join(f"{k}={v}" for k, v in sorted(r["ledger"].items())),
        ]
        for r in runs
    ]  # fmt: skip
    headers = ["L s", "S", "files", "seconds", "files/s", "LLM requests",
               "limit S/L / (req/file)", "ratio", "bare client files/s", "launches",
               "launch ids", "result files", "ledger"]  # fmt: skip
    tables = {f"Burst of {args.files} files (steps 1-5 in turn)": table(headers, rows)}
    data: dict[str, Any] = {"runs": runs}
    for r in runs:
        if "timings" in r:
            text, data["profile"] = phase_table(r.pop("timings"), r["files"])
            lag = r["loop_lag"]
            tables[
                f"Daemon phases, L={r['L_s']} S={r['S']} burst (perf_counter around its"
                f" functions); event-loop lag median {lag['median_ms']} ms,"
                f" p99 {lag['p99_ms']} ms, max {lag['max_ms']} ms"
            ] = text
    save("burst_profile" if args.profile else "burst", command_line(), tables, data)
    bad = [r for r in runs if not (r["launches"] == r["distinct_result_files"] == r["files"])]
    if bad:
        raise SystemExit(f"exactly-once broken: {bad}")


if __name__ == "__main__":
    main()
