"""Agents as Slurm jobs on the one-node cluster of scripts/slurm-node.sh (root; Debian's
slurm-wlm 22.05): sbatch's own time, submission → the agent's first instruction, the agent's
last instruction → the launcher reporting its end (the daemon's `agent.exited`), and the cost
of one poll (`squeue` for all watched jobs) and of the one `scontrol` a job's end costs.

Jobs run one after another (the node has as many slots as cores), each a shell that writes
the wall clock when it starts and again as its last act.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import REPO, command_line, save, summary_ms, table
from prng_daemon.config import AgentConfig, SlurmOptions
from prng_daemon.handlers.act.launcher import AgentRun, Launch
from prng_daemon.handlers.act.slurm import POLL_SECONDS, SlurmLauncher

JOBS = 20
AGENT = 'date +%s.%N >"$1.start"; date +%s.%N >"$1.end"'


async def measure(work: Path) -> dict[str, list[float]]:
    spent: dict[str, list[float]] = {"sbatch": [], "running": [], "exited": []}
    ended: asyncio.Queue[float] = asyncio.Queue()
    launcher = SlurmLauncher(work / "launches", work / "jobs",
                             lambda *_: ended.put_nowait(time.time()))  # fmt: skip
    for i in range(JOBS):
        stamp = work / f"job{i}"
        config = AgentConfig(argv=("/bin/sh", "-c", AGENT, "agent", str(stamp)),
                             launcher="slurm", slurm=SlurmOptions())  # fmt: skip
        began = time.time()
        await launcher.start(Launch(AgentRun(i, f"{os.getpid():08x}{i:024x}", f"b{i}", "b"),
                                    config, {}))  # fmt: skip
        submitted = time.time()
        reported = await asyncio.wait_for(ended.get(), 60)
        spent["sbatch"].append(submitted - began)
        spent["running"].append(float(Path(f"{stamp}.start").read_text()) - submitted)
        spent["exited"].append(reported - float(Path(f"{stamp}.end").read_text()))
    await launcher.stop()
    return spent


def timed(argv: list[str], n: int = 20) -> list[float]:
    seconds = []
    for _ in range(n):
        began = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        seconds.append(time.perf_counter() - began)
    return seconds


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("cannot run: the test cluster's daemons run as root")
    node = str(REPO / "scripts" / "slurm-node.sh")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["SLURM_CONF"] = str(work / "cluster" / "slurm.conf")
        os.environ.setdefault("SLURM_PORT", "6917")
        subprocess.run([node, "start", str(work / "cluster")], check=True, stdout=sys.stderr)
        try:
            spent = asyncio.run(measure(work))
            jobs = ",".join(str(i) for i in range(1, JOBS + 1))
            spent["poll"] = timed(["squeue", "-h", "--states=all", f"--jobs={jobs}",
                                   "--format=%i|%T|%N"])  # fmt: skip
            spent["end"] = timed(["scontrol", "--oneliner", "show", "job", "1"])
        finally:
            subprocess.run([node, "stop", str(work / "cluster")], check=True)
    how = {
        "sbatch": "SlurmLauncher.start (the launch record, sbatch, the job id recorded)",
        "running": "submitted → the agent's first instruction on the node",
        "exited": f"the agent's last instruction → its end seen (poll every {POLL_SECONDS:g} s)",
        "poll": f"one poll: squeue --jobs=<{JOBS} ids>",
        "end": "a job's end: scontrol show job (its exit code)",
    }  # fmt: skip
    summary = {how[k]: summary_ms(v) for k, v in spent.items()}
    rows: list[list[Any]] = [
        [k, s["n"], s["median_ms"], s["p99_ms"], s["max_ms"]] for k, s in summary.items()
    ]
    save("slurm", command_line(),
         {"Slurm jobs (one-node cluster, slurm-wlm 22.05)":
          table(["what", "n", "median ms", "p99 ms", "max ms"], rows)},
         {"slurm": summary})  # fmt: skip


if __name__ == "__main__":
    main()
