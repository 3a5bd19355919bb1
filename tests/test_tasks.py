"""Supervised tasks: a crash is logged and restarted, a spent budget fails, a stuck task stops the
watchdog pings (against a real datagram socket standing in for systemd's)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from prng_daemon.servers.backoff import RestartBudget
from prng_daemon.service.notify import Notifier
from prng_daemon.service.tasks import Tasks

from .helpers import until


def quick_budget(attempts: int) -> RestartBudget:
    return RestartBudget(attempts, window=60.0, initial=0.01, cap=0.01, stable_after=60.0)


def test_a_crashing_task_is_logged_with_its_traceback_and_restarted() -> None:
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) <= 2:
            raise RuntimeError(f"bug #{len(runs)}")
        await asyncio.Event().wait()  # the third run stays up

    async def main() -> Tasks:
        tasks = Tasks(budget=lambda: quick_budget(5))
        tasks.start("flaky", flaky, deadline=None)
        await until(lambda: len(runs) >= 3, 10, "the third run")
        await tasks.stop()
        return tasks

    with capture_logs() as logs:
        tasks = asyncio.run(main())
    crashed = [e for e in logs if e["event"] == "task.crashed"]
    assert [e["error"] for e in crashed] == ["RuntimeError('bug #1')", "RuntimeError('bug #2')"]
    assert all(e["log_level"] == "error" and e["exc_info"] for e in crashed), "with traceback"
    assert [e["task"] for e in logs if e["event"] == "task.restarting"] == ["flaky", "flaky"]
    assert not tasks.failed.is_set()


def test_a_task_that_keeps_crashing_spends_its_budget_and_fails_the_daemon() -> None:
    async def broken() -> None:
        raise OSError("disk I/O error")

    async def main() -> Tasks:
        tasks = Tasks(budget=lambda: quick_budget(3))
        tasks.start("commands", broken, deadline=10.0)
        await asyncio.wait_for(tasks.failed.wait(), timeout=5)
        return tasks

    with capture_logs() as logs:
        tasks = asyncio.run(main())
    assert sum(e["event"] == "task.crashed" for e in logs) == 4, "the first run and 3 restarts"
    assert tasks.failure == "task commands crashed 4 times; giving up"
    assert tasks.problems() == ["commands dead: crashed 4 times"]


def test_a_task_that_returns_is_finished_not_restarted() -> None:
    async def main() -> Tasks:
        tasks = Tasks(budget=lambda: quick_budget(3))

        async def done() -> None:
            return None

        await tasks.start("worker-0", done, deadline=1.0)
        return tasks

    with capture_logs() as logs:
        tasks = asyncio.run(main())
    assert logs == [] and tasks.problems() == [] and not tasks.failed.is_set()


def test_watchdog_pings_stop_while_a_task_is_stuck_and_status_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WATCHDOG=1 means every task made progress within its deadline, not that the loop turns."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        monkeypatch.setenv("WATCHDOG_USEC", "100000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        notifier = Notifier()

        async def main() -> tuple[list[str], list[str], list[str]]:
            loop = asyncio.get_running_loop()
            tasks = Tasks()
            wedged = asyncio.Event()
            freed = asyncio.Event()

            async def worker() -> None:
                while True:
                    tasks.beat("worker-0")
                    if wedged.is_set():
                        await freed.wait()  # a wait that never ends, as a deadlock would
                        wedged.clear()
                    await asyncio.sleep(0.01)

            async def received(until: str) -> list[str]:
                """Datagrams up to the first that starts with `until`."""
                got = [(await loop.sock_recv(sock, 4096)).decode()]
                while not got[-1].startswith(until):
                    got.append((await loop.sock_recv(sock, 4096)).decode())
                return got

            sock.setblocking(False)
            tasks.start("worker-0", worker, deadline=0.3)
            tasks.start("watchdog", lambda: notifier.watchdog_loop(tasks.problems), None)
            healthy = await asyncio.wait_for(received("WATCHDOG=1"), 5)
            wedged.set()
            await asyncio.wait_for(
                received("STATUS=unhealthy: worker-0 stuck: no progress for "), 5
            )
            # From the STATUS= on, while stuck: ten ping intervals, no ping.
            quiet = await asyncio.wait_for(_for(loop, sock, 1.0), 5)
            freed.set()
            resumed = await asyncio.wait_for(received("WATCHDOG=1"), 5)
            await tasks.stop()
            return healthy, quiet, resumed

        with capture_logs() as logs:
            healthy, quiet, resumed = asyncio.run(main())
    assert healthy[-1] == "WATCHDOG=1"
    assert "WATCHDOG=1" not in quiet, quiet
    assert resumed[-1] == "WATCHDOG=1"
    withheld = [e for e in logs if e["event"] == "watchdog.withheld"]
    assert len(withheld) == 1 and withheld[0]["problems"][0].startswith("worker-0 stuck")
    assert [e["event"] for e in logs if e["event"] == "watchdog.resumed"] == ["watchdog.resumed"]


async def _for(loop: asyncio.AbstractEventLoop, sock: socket.socket, seconds: float) -> list[str]:
    """Every datagram that arrives in the next `seconds`."""
    got: list[str] = []
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        try:
            got.append((await asyncio.wait_for(loop.sock_recv(sock, 4096), left)).decode())
        except TimeoutError:
            break
    return got


def test_stopped_tasks_are_no_longer_watched() -> None:
    """A cancelled (drained) worker is not reported as stuck afterwards."""
    now = [0.0]

    async def main() -> list[str]:
        tasks = Tasks(clock=lambda: now[0])

        async def busy() -> None:
            tasks.beat("worker-0")
            await asyncio.Event().wait()

        tasks.start("worker-0", busy, deadline=10.0)
        await asyncio.sleep(0)
        now[0] = 60.0
        stuck = tasks.problems()
        await tasks.stop()
        return stuck + tasks.problems()

    assert asyncio.run(main()) == ["worker-0 stuck: no progress for 60s"]
