"""Watch the results directory: completed files in, as paths on the asyncio loop.

React to close-after-write and to renames/moves into the directory, never to `created`
(a file being copied is created long before it is complete). The watcher alone is never
trusted: the kernel drops events on queue overflow and NFS writes from other hosts raise
none, so `scan()` lists the directory for a catch-up at start and periodically. A directory
that is deleted and made again takes its inotify watch with it: `stale()` notices, `rearm()`
watches the new one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from collections.abc import Callable, Container
from pathlib import Path
from types import TracebackType

from watchdog.events import (
    DirDeletedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.inotify import InotifyObserver

from .document.names import utf8_name
from .log import get_logger

__all__ = ["Watcher", "is_candidate"]

OnPath = Callable[[Path, str], None]

log = get_logger()


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
    def __init__(
        self,
        directory: Path,
        loop: asyncio.AbstractEventLoop,
        on_path: OnPath,
        on_gone: Callable[[], None],
    ) -> None:
        self._dir = str(directory)
        self._loop = loop
        self._on_path = on_path
        self._on_gone = on_gone

    def _hand_over(self, path: str, source: str) -> None:
        parent, _, name = path.rpartition("/")
        if parent == self._dir and is_candidate(name):
            self._loop.call_soon_threadsafe(self._on_path, Path(path), source)

    def on_closed(self, event: FileClosedEvent) -> None:
        self._hand_over(str(event.src_path), "closed")

    def on_moved(self, event: FileSystemEvent) -> None:
        # Also a move in from another directory: with full events its src_path is "".
        self._hand_over(str(event.dest_path), "moved")

    def on_deleted(self, event: FileSystemEvent) -> None:
        # The watched directory itself: its inotify watch went with it (watchdog's emitter
        # stops), so nothing more arrives until the watch is armed again.
        if str(event.src_path) == self._dir:
            self._on_gone()


class _OverflowAlarm(logging.Handler):
    """watchdog (7.1 on) reports IN_Q_OVERFLOW only as a log warning; turn that into a rescan."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self._loop = loop
        self._on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage():
            log.warning("watcher.overflow", action="rescanning")
            self._loop.call_soon_threadsafe(self._on_overflow)


class Watcher:
    """The observer as a context manager: started on enter, stopped and joined on exit.

    `on_rescan` is called (on the loop) when events were lost: a queue overflow, or the
    directory itself went away. `rearm()` then watches the directory as it is now; when the
    kernel's inotify limits refuse a watch, `degraded` says why and only scans find files.
    """

    def __init__(
        self,
        directory: Path,
        loop: asyncio.AbstractEventLoop,
        on_path: OnPath,
        on_rescan: Callable[[], None],
    ) -> None:
        self.directory = directory
        self.degraded: str | None = None
        """Why inotify is not watching (its limits); None while it is."""
        self._loop = loop
        self._on_path = on_path
        self._on_rescan = on_rescan
        self._observer: InotifyObserver | None = None
        self._watched: tuple[int, int] | None = None
        self._gone = False
        # rearm() runs in a worker thread (the daemon's rescan), __exit__ on the loop: one at
        # a time, and none after the exit, or an observer could outlive the watcher.
        self._lock = threading.Lock()
        self._closed = False
        self._alarm = _OverflowAlarm(loop, on_rescan)
        self._watchdog_log = logging.getLogger("watchdog.observers.inotify_c")

    def __enter__(self) -> Watcher:
        self._watchdog_log.addHandler(self._alarm)
        try:
            self.rearm()
        except BaseException:
            self._watchdog_log.removeHandler(self._alarm)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self._closed = True
            self._stop_observer()
        self._watchdog_log.removeHandler(self._alarm)

    def rearm(self) -> None:
        """Watch the directory as it is at its path now (FileNotFoundError if it is not there).

        Hitting the inotify instance or watch limit (EMFILE, ENOSPC) is not fatal: the watcher
        is then `degraded`, logged once, and the daemon finds files by scanning more often.
        """
        with self._lock:
            if not self._closed:
                self._arm()

    def _arm(self) -> None:
        self._stop_observer()
        info = os.stat(self.directory)
        self._gone = False
        try:
            # watchdog >= 7 makes the inotify instance here (EMFILE), the watch in start()
            # (ENOSPC); older versions both in start().
            observer = InotifyObserver(generate_full_events=True)
            observer.schedule(
                _Handler(self.directory, self._loop, self._on_path, self._lost),
                str(self.directory),
                recursive=False,
                event_filter=[FileClosedEvent, FileMovedEvent, DirDeletedEvent],
            )
            try:
                observer.start()
            except BaseException:
                observer.stop()  # ends watchdog's own reader thread; the observer never ran
                raise
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENOSPC, errno.ENFILE):
                raise
            if self.degraded is None:
                log.warning(
                    "watcher.degraded", directory=str(self.directory), error=str(exc),
                    action="scanning instead of inotify",
                )  # fmt: skip
            self.degraded = str(exc)
            return
        if self.degraded is not None:
            log.info("watcher.recovered", directory=str(self.directory))
        self.degraded = None
        self._observer = observer
        self._watched = (info.st_dev, info.st_ino)

    def stale(self) -> bool:
        """Whether the watch no longer covers the directory at its path (FileNotFoundError if
        there is none): it was deleted, moved away or replaced, or inotify refused it."""
        info = os.stat(self.directory)
        return self._gone or self._observer is None or self._watched != (info.st_dev, info.st_ino)

    def _lost(self) -> None:
        # On the observer thread: a flag (read by stale()), and a rescan to notice at once.
        self._gone = True
        self._loop.call_soon_threadsafe(self._on_rescan)

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None

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
