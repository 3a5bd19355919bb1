"""The watcher: completed files only, temp files ignored, a queue overflow becomes a rescan."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

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
    """watchdog only logs IN_Q_OVERFLOW; the watcher turns it into a rescan request."""

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
            # Keep watchdog's reader thread off the inotify fd while the burst lands, so the
            # kernel queue overflows for certain rather than by losing a scheduling race.
            with watcher._observer._inotify_fd._lock:  # type: ignore[attr-defined]
                await loop.run_in_executor(None, burst)
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
            await loop.run_in_executor(None, watcher.rearm)
            rearmed = not watcher.stale()
            (results / "new.json").write_text("{}")
            await until(lambda: seen, 5, "the file in the re-armed dir")
        return seen, stale, rearmed

    seen, stale, rearmed = asyncio.run(main())
    assert stale and rearmed
    assert seen == ["new.json"]
