"""The watcher: completed files only, temp files ignored, a queue overflow becomes a rescan,
events handed from watchdog's threads to the loop, every thread and fd gone on exit."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from prng_daemon.watcher import Watcher, is_candidate

from .helpers import until

MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")


def test_candidate_names() -> None:
    assert is_candidate("step2_20251201_143022_abc123.json")
    for name in (".hidden.json", "x.json.tmp", "x.tmp.json", "x.part.json", "#x.json", "x.txt"):
        assert not is_candidate(name), name


SENTINEL = "zz_sentinel.json"


async def _collect(directory: Path, action: object) -> tuple[list, list]:
    """What the watcher reports for `action`: a sentinel file written after it is reported
    after everything the action caused (inotify keeps order), so its arrival ends the wait."""
    loop = asyncio.get_running_loop()
    seen: list[tuple[str, str]] = []
    overflows: list[bool] = []
    with Watcher(directory, loop, lambda p, s: seen.append((p.name, s)),
                 lambda: overflows.append(True)):  # fmt: skip
        await loop.run_in_executor(None, action)  # type: ignore[arg-type]
        (directory / SENTINEL).write_text("{}")
        await until(lambda: (SENTINEL, "closed") in seen, 10, "the sentinel's event")
    seen.remove((SENTINEL, "closed"))
    return seen, overflows


def test_close_and_rename_are_reported_partial_writes_are_not(tmp_path: Path) -> None:
    (tmp_path / "decisions").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside.json"

    def act() -> None:
        with open(tmp_path / "piece.json", "w") as f:
            f.write('{"a":')
            f.flush()
            f.write("1}")
        (tmp_path / ".tmp.json").write_text("{}")
        os.replace(tmp_path / ".tmp.json", tmp_path / "renamed.json")
        outside.write_text("{}")
        os.replace(outside, tmp_path / "moved_in.json")
        (tmp_path / "decisions" / "d.json").write_text("{}")
        (tmp_path / "notes.txt").write_text("x")

    seen, overflows = asyncio.run(_collect(tmp_path, act))
    assert sorted(seen) == [("moved_in.json", "moved"), ("piece.json", "closed"),
                            ("renamed.json", "moved")]  # fmt: skip
    assert not overflows


_BURST = """
import os, signal, sys
directory, count = sys.argv[1], int(sys.argv[2])
os.kill(os.getppid(), signal.SIGSTOP)
try:
    for n in range(count):
        with open(os.path.join(directory, f"f{n}.json"), "w"):
            pass
finally:
    os.kill(os.getppid(), signal.SIGCONT)
"""


def test_inotify_queue_overflow_triggers_a_rescan(tmp_path: Path) -> None:
    """The kernel's IN_Q_OVERFLOW, through watchdog's EventsLostEvent, becomes a logged rescan.

    A child stops the test's whole process (every watchdog thread with it), writes more files
    than the kernel queues, then continues it: the queue overflows for certain, not by a race.
    As root the queue is shrunk to 16 first; else the machine's own limit is exceeded."""
    limit = int(MAX_QUEUED.read_text())
    shrink = os.access(MAX_QUEUED, os.W_OK)
    if not shrink and limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to overflow it unprivileged")

    async def main() -> tuple[list[str], list[bool]]:
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        overflows: list[bool] = []
        # The kernel reads the limit when the inotify instance is made (entering the Watcher).
        if shrink:
            MAX_QUEUED.write_text("16")
        try:
            watcher = Watcher(tmp_path, loop, lambda p, s: seen.append(p.name),
                              lambda: overflows.append(True)).__enter__()  # fmt: skip
        finally:
            if shrink:
                MAX_QUEUED.write_text(str(limit))
        count = (16 if shrink else limit) + 100
        try:
            burst = [sys.executable, "-c", _BURST, str(tmp_path), str(count)]
            subprocess.run(burst, check=True, timeout=60)
            await until(lambda: overflows, 10, "the overflow")
        finally:
            watcher.__exit__(None, None, None)
        return seen, overflows

    with capture_logs() as logs:
        seen, overflows = asyncio.run(main())
    assert overflows, f"the overflow was not reported ({len(seen)} events seen)"
    assert "watcher.overflow" in [e["event"] for e in logs]
    assert len(seen) < count_written(tmp_path), "events were lost, which is why the rescan matters"


def count_written(directory: Path) -> int:
    return sum(1 for name in os.listdir(directory) if name.endswith(".json"))


def test_a_deleted_directory_is_reported_and_rearm_watches_the_new_one(tmp_path: Path) -> None:
    """The inotify watch goes with a deleted directory: the watcher says so (a rescan request,
    `stale()`), and `rearm()` watches the one made again at the same path."""
    results = tmp_path / "results"
    results.mkdir()

    async def main() -> tuple[list[str], bool, bool]:
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        lost = asyncio.Event()
        with Watcher(results, loop, lambda p, s: seen.append(p.name), lost.set) as watcher:
            assert not watcher.stale()
            await loop.run_in_executor(None, shutil.rmtree, results)
            await asyncio.wait_for(lost.wait(), 5)
            with pytest.raises(FileNotFoundError):
                watcher.stale()
            results.mkdir()
            stale = watcher.stale()
            watcher.rearm()
            rearmed = not watcher.stale()
            (results / "new.json").write_text("{}")
            await until(lambda: seen, 5, "the file in the re-armed dir")
        return seen, stale, rearmed

    seen, stale, rearmed = asyncio.run(main())
    assert stale and rearmed
    assert seen == ["new.json"]


def _fds() -> set[str]:
    return {f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}" for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}  # fmt: skip


def test_exit_stops_every_thread_and_closes_every_fd(tmp_path: Path) -> None:
    """watchdog's observer threads and its inotify instance live as long as the `with`."""

    async def main() -> tuple[list[str], set[str], set[str], set[threading.Thread], set[str]]:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: None)  # the executor's thread, made beforehand
        threads = set(threading.enumerate())
        fds = _fds()
        seen: list[str] = []
        with Watcher(tmp_path, loop, lambda p, s: seen.append(p.name), lambda: None):
            (tmp_path / "a.json").write_text("{}")
            await until(lambda: seen, 5, "the event")
            during = _fds() - fds
        return seen, fds, _fds(), set(threading.enumerate()) - threads, during

    seen, before, after, left, during = asyncio.run(main())
    assert seen == ["a.json"]
    assert any(fd.endswith("anon_inode:inotify") for fd in during), during
    assert before == after, f"left open: {after - before}"
    assert not left, f"threads left running: {left}"


def test_the_inotify_instance_is_not_inherited_by_children(tmp_path: Path) -> None:
    """watchdog makes its inotify instance inheritable; the watcher marks it close-on-exec, so
    an agent spawned while the watch is armed (posix_spawn closes nothing) does not hold it."""
    out = tmp_path / "fds.txt"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with Watcher(tmp_path, loop, lambda p, s: None, lambda: None):
            # `ls` lists its own descriptors: what the shell had, as any agent would.
            pid = os.posix_spawn(
                "/bin/sh", ["sh", "-c", "exec ls -l /proc/self/fd/"], dict(os.environ),
                file_actions=[(os.POSIX_SPAWN_OPEN, 1, str(out), os.O_WRONLY | os.O_CREAT, 0o600)],
            )  # fmt: skip
            os.waitpid(pid, 0)

    asyncio.run(main())
    assert "anon_inode:inotify" not in out.read_text()


def test_a_failing_consumer_is_logged_and_asks_for_a_rescan(tmp_path: Path) -> None:
    """An exception in `on_path` is one file's problem: it is logged with its traceback, a
    rescan is asked for (the scan finds that file again), and later events still arrive."""

    def on_path(path: Path, source: str) -> None:
        if path.name == "boom.json":
            raise RuntimeError("a bug in the consumer")
        seen.append(path.name)

    seen: list[str] = []

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        rescans: list[bool] = []
        with Watcher(tmp_path, loop, on_path, lambda: rescans.append(True)) as w:
            (tmp_path / "boom.json").write_text("{}")
            await until(lambda: rescans, 5, "the rescan request")
            (tmp_path / "after.json").write_text("{}")
            await until(lambda: seen, 5, "an event after the failure")
            return w.stale()

    with capture_logs() as logs:
        stale = asyncio.run(main())
    assert not stale, "the consumer failed, not the watch"
    assert seen == ["after.json"]
    [failed] = [e for e in logs if e["log_level"] == "error"]
    assert failed["event"] == "watcher.failed" and failed["exc_info"]
