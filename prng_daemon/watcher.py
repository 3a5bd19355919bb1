"""Watch the results directory: completed files in, as paths on the asyncio loop.

React to close-after-write and to renames/moves into the directory, never to `created`
(a file being copied is created long before it is complete). The watcher alone is never
trusted: the kernel drops events on queue overflow and NFS writes from other hosts raise
none, so `scan()` lists the directory for a catch-up at start and periodically.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Container
from pathlib import Path
from types import TracebackType

from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

from .names import utf8_name

__all__ = ["Watcher", "is_candidate"]

OnPath = Callable[[Path, str], None]


def is_candidate(name: str) -> bool:
    """A result file name: `*.json`, not hidden, not an editor's or copier's temp file."""
    return (
        name.endswith(".json")
        and not name.startswith((".", "#", "~"))
        and ".tmp" not in name
        and ".part" not in name
    )


class _Handler(FileSystemEventHandler):
    # Runs on the observer thread: hand over at once, nothing else (all events share it).
    def __init__(self, directory: Path, loop: asyncio.AbstractEventLoop, on_path: OnPath) -> None:
        self._dir = str(directory)
        self._loop = loop
        self._on_path = on_path

    def _hand_over(self, path: str, source: str) -> None:
        parent, _, name = path.rpartition("/")
        if parent == self._dir and is_candidate(name):
            self._loop.call_soon_threadsafe(self._on_path, Path(path), source)

    def on_closed(self, event: FileClosedEvent) -> None:
        self._hand_over(str(event.src_path), "closed")

    def on_moved(self, event: FileSystemEvent) -> None:
        # Also a move in from another directory: with full events its src_path is "".
        self._hand_over(str(event.dest_path), "moved")


class _OverflowAlarm(logging.Handler):
    """watchdog reports IN_Q_OVERFLOW only as a log warning; turn that into a rescan."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self._loop = loop
        self._on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage():
            self._loop.call_soon_threadsafe(self._on_overflow)


class Watcher:
    """The observer as a context manager: started on enter, stopped and joined on exit."""

    def __init__(
        self,
        directory: Path,
        loop: asyncio.AbstractEventLoop,
        on_path: OnPath,
        on_overflow: Callable[[], None],
    ) -> None:
        self.directory = directory
        self._observer = InotifyObserver(generate_full_events=True)
        self._observer.schedule(
            _Handler(directory, loop, on_path),
            str(directory),
            recursive=False,
            event_filter=[FileClosedEvent, FileMovedEvent],
        )
        self._alarm = _OverflowAlarm(loop, on_overflow)
        self._watchdog_log = logging.getLogger("watchdog.observers.inotify_c")

    def __enter__(self) -> Watcher:
        self._watchdog_log.addHandler(self._alarm)
        self._observer.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._observer.stop()
        self._observer.join()
        self._watchdog_log.removeHandler(self._alarm)

    def scan(self, skip: Container[str] = ()) -> list[Path]:
        """Candidate result files now in the directory, oldest first, except names in `skip`.

        Only the names not skipped are stat'ed: with 100,000 decided files a rescan is one
        directory listing, not 100,000 system calls.
        """
        with os.scandir(self.directory) as entries:
            names = [e.name for e in entries if is_candidate(e.name) and e.name not in skip]
        found = []
        for name in names:
            if utf8_name(name) in skip:  # not UTF-8: the ledger knows it (quarantined) in this form
                continue
            path = self.directory / name
            try:
                found.append((path.lstat().st_mtime_ns, path))
            except OSError:
                continue
        return [path for _, path in sorted(found)]
