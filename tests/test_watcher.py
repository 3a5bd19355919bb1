"""The watcher: completed files only, temp files ignored, a queue overflow becomes a rescan,
all of it on the event loop's own thread (no thread of watchdog's), every fd closed on exit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, InotifyFD, WatchDescriptor

from prng_daemon.watcher import Watcher, inotify_fd, is_candidate

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


@contextmanager
def _small_inotify_queue(size: int) -> Iterator[None]:
    old = MAX_QUEUED.read_text()
    MAX_QUEUED.write_text(str(size))
    try:
        yield
    finally:
        MAX_QUEUED.write_text(old)


@pytest.mark.skipif(not os.access(MAX_QUEUED, os.W_OK), reason="needs root to shrink the queue")
def test_inotify_queue_overflow_triggers_a_rescan(tmp_path: Path) -> None:
    """The kernel's IN_Q_OVERFLOW becomes a rescan request."""

    def burst() -> None:
        for n in range(400):
            (tmp_path / f"f{n}.json").write_text("{}")

    async def main() -> tuple[list, list]:
        # The kernel reads the limit when the inotify instance is made (entering the Watcher).
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        overflows: list[bool] = []
        watcher = Watcher(tmp_path, loop, lambda p, s: seen.append(p.name),
                          lambda: overflows.append(True))  # fmt: skip
        with contextlib.ExitStack() as stack:
            with _small_inotify_queue(16):
                stack.enter_context(watcher)
            # On the loop's own thread: the loop, which reads the inotify fd, cannot read while
            # the burst lands, so the kernel queue overflows for certain, not by a lost race.
            burst()
            await until(lambda: overflows, 5, "the overflow")
            return seen, overflows

    seen, overflows = asyncio.run(main())
    assert overflows, f"the overflow was not reported ({len(seen)} events seen)"
    assert len(seen) < 400, "events were lost, which is why the rescan matters"


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


def test_the_watchdog_internals_the_watcher_uses_are_still_there() -> None:
    """watchdog has no public name for its inotify fd (`_inotify_fd`) nor a way to close an
    instance that was never started (`_is_reading`): a release that changes either fails here."""
    before = _fds()
    inotify = InotifyFD()
    assert os.readlink(f"/proc/self/fd/{inotify_fd(inotify)}") == "anon_inode:inotify"
    assert inotify._is_reading is True, "watchdog 7.1's state of a reader never started"
    inotify._is_reading = False
    inotify.close()
    assert _fds() == before, "close() of an instance never read leaves its fds open"


def test_no_thread_runs_and_exit_closes_every_fd(tmp_path: Path) -> None:
    """Events are read by the loop itself: no thread is started for them, none is left, and
    the inotify instance (with watchdog's wake-up pipe) is closed on exit."""

    async def main() -> tuple[list[str], set[str], set[str], int]:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: None)  # the executor's thread, made beforehand
        threads = set(threading.enumerate())
        fds = _fds()
        seen: list[str] = []
        with Watcher(tmp_path, loop, lambda p, s: seen.append(p.name), lambda: None) as w:
            assert w._inotify is not None
            fd = inotify_fd(w._inotify)
            (tmp_path / "a.json").write_text("{}")
            await until(lambda: seen, 5, "the event")
            during = set(threading.enumerate()) - threads
        assert not during, f"threads started for the watch: {during}"
        return seen, fds, _fds(), fd

    seen, before, after, fd = asyncio.run(main())
    assert seen == ["a.json"]
    assert before == after, f"left open: {after - before}"
    with pytest.raises(OSError):
        os.fstat(fd)


def test_an_overflow_reported_by_watchdog_is_logged_and_requests_a_rescan(tmp_path: Path) -> None:
    """watchdog's own IN_Q_OVERFLOW event (wd -1), through its `handle_event`, as its reader
    gives it: the watcher's `on_queue_overflow` logs it and asks for a rescan (no root needed)."""

    async def main() -> list[bool]:
        loop = asyncio.get_running_loop()
        overflows: list[bool] = []
        with Watcher(tmp_path, loop, lambda p, s: None, lambda: overflows.append(True)) as w:
            assert w._inotify is not None
            event = InotifyEvent(WatchDescriptor(-1), InotifyConstants.IN_Q_OVERFLOW, 0, b"")
            w._inotify.handle_event(event)
            assert not w.stale(), "an overflow loses events, not the watch"
        return overflows

    with capture_logs() as logs:
        overflows = asyncio.run(main())
    assert overflows == [True]
    assert [e["event"] for e in logs] == ["watcher.overflow"]


def test_a_failure_while_reading_events_is_logged_and_the_rescan_rearms(tmp_path: Path) -> None:
    """An exception in the loop's reader callback would otherwise go to asyncio's handler and
    leave the fd readable (the callback again, forever): it is logged, the watch dropped,
    `stale()` says so, a rescan is asked for, and `rearm()` watches again."""

    def on_path(path: Path, source: str) -> None:
        if path.name == "boom.json":
            raise RuntimeError("a bug in the consumer")
        seen.append(path.name)

    seen: list[str] = []

    async def main() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        rescans: list[bool] = []
        with Watcher(tmp_path, loop, on_path, lambda: rescans.append(True)) as w:
            (tmp_path / "boom.json").write_text("{}")
            await until(lambda: rescans, 5, "the rescan request")
            stale = w.stale()
            w.rearm()
            rearmed = not w.stale()
            (tmp_path / "after.json").write_text("{}")
            await until(lambda: seen, 5, "an event after the re-arm")
        return stale, rearmed

    with capture_logs() as logs:
        stale, rearmed = asyncio.run(main())
    assert stale and rearmed
    assert seen == ["after.json"]
    [failed] = [e for e in logs if e["log_level"] == "error"]
    assert failed["event"] == "watcher.failed" and failed["exc_info"]


def test_arming_or_closing_off_the_loop_thread_is_refused(tmp_path: Path) -> None:
    """add_reader/remove_reader are not thread-safe: a worker thread may not arm the watch."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with Watcher(tmp_path, loop, lambda p, s: None, lambda: None) as w:
            with pytest.raises(RuntimeError, match="loop's thread"):
                await loop.run_in_executor(None, w.rearm)
            assert not w.stale(), "the refused call left the watch as it was"

    asyncio.run(main())
