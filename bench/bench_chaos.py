"""Fault drill: the daemon SIGKILLed at random moments during a 500-file run and restarted each
time; at the end every file must be decided once and no agent launched twice."""

from __future__ import annotations

import argparse
import random
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench._common import (
    agents_section,
    build_agent,
    command_line,
    marker_names,
    read_markers,
    save,
    table,
    wait_for,
)
from tests.fake_llama import FakeLlama
from tests.workspace import drop, make_workspace, result_document, run_id, stop

DROP_INTERVAL = 0.012
"""500 files over about 6 s: some arrive while the daemon is dead and are found by catch-up."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    kill_times = []
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp, FakeLlama() as fake:
        fake.latency, fake.slots = 0.01, 4
        agent, _ = build_agent(Path(tmp))
        ws = make_workspace(Path(tmp) / "ws", fake.port,
                            agents=agents_section(agent, Path(tmp) / "ws" / "markers"))  # fmt: skip

        def dropper() -> None:
            for n in range(args.files):
                number = 1 + n % 5  # steps 1-5: every decision launches an agent
                drop(ws.results, f"c{n:05d}.json", result_document(number, run_id(number, n)))
                time.sleep(DROP_INTERVAL)  # the arrival rate of the workload

        writer = threading.Thread(target=dropper)
        began = time.monotonic()
        proc = ws.start()
        writer.start()
        try:
            for _ in range(args.kills):
                # Anywhere from mid-start-up (imports, reconcile) to deep in the run.
                time.sleep(rng.uniform(0.2, 2.0))  # the random moment of the kill
                settled = ws.ledger_states() if (ws.root / "state").exists() else {}
                kill_times.append((round(time.monotonic() - began, 2), sum(settled.values()),
                                   len(marker_names(ws.markers))))  # fmt: skip
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                proc = ws.start()
            writer.join()
            done = wait_for(lambda: ws.finished(args.files), 240, interval=0.2)
            wait_for(lambda: len(marker_names(ws.markers)) >= args.files, 30, interval=0.1)
        finally:
            writer.join()
            code = stop(proc, 60)
        elapsed = time.monotonic() - began
        markers = read_markers(ws.markers)
        ledger = ws.ledger_states()
        records = len(list((ws.results / "decisions").glob("*.decision.json")))
        interrupted = sum(e.get("event") == "agent.reconciled" for e in ws.events())
    per_file = Counter(result for _, result in markers.values())
    duplicates = sum(n - 1 for n in per_file.values() if n > 1)
    launch_ids = {name.split("-")[0] for name in markers}
    row = [args.files, args.kills, args.seed, round(elapsed, 1), bool(done),
           sum(ledger.values()), " ".join(f"{k}={v}" for k, v in sorted(ledger.items())),
           len(markers), len(launch_ids), len(per_file), duplicates, records,
           interrupted]  # fmt: skip
    headers = ["files", "kills", "seed", "seconds", "all settled", "ledger rows", "ledger states",
               "launches", "launch ids", "files launched", "duplicate launches",
               "decision records", "agent.reconciled"]  # fmt: skip
    kills = table(["kill at s", "ledger rows then", "launches then"], kill_times)
    tables = {"Fault drill": table(headers, [row]), "The kills": kills}
    ok = len(markers) == len(per_file) == args.files and not duplicates and code == 0
    ok = ok and ledger == {"acted": args.files}
    save("chaos", command_line(), tables,
         {"ok": ok, "ledger": ledger, "kills": kill_times, "seed": args.seed,
          "duplicates": duplicates, "launches": len(markers)})  # fmt: skip
    print("exactly once:", "yes" if ok else "NO")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
