"""Watch the results directory: completed files in, as paths on the asyncio loop.

React to close-after-write and to renames/moves into the directory, never to `created`
(a file being copied is created long before it is complete). The watcher alone is never
trusted: the kernel drops events on queue overflow and NFS writes from other hosts raise
none, so `scan()` lists the directory for a catch-up at start and periodically. A directory
that is deleted and made again takes its inotify watch with it: `stale()` notices, `rearm()`
watches the new one.

watchdog's observer reads the events on its own threads; the handler only hands each one to
the loop (`call_soon_threadsafe`), where `on_path` and `on_rescan` run.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Container
from pathlib import Path
from types import TracebackType

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileClosedEvent,
    FileDeletedEvent,
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

_EVENTS: list[type[FileSystemEvent]] = [
    FileClosedEvent, FileMovedEvent, DirDeletedEvent, FileDeletedEvent, EventsLostEvent,
]  # fmt: skip
"""Closed after writing and moved in, never created; the directory itself going away (a
deleted watch root may come as either kind); and the kernel's queue overflow."""


def is_candidate(name: str) -> bool:
    """A result file name: `*.json`, not hidden, not an editor's or copier's temp file."""
    return (
        name.endswith(".json")
        and not name.startswith((".", "#", "~"))
        and ".tmp" not in name
        and ".part" not in name
    )


def _close_inotify_on_exec() -> None:
    """Mark the process's inotify instances close-on-exec.

    watchdog makes its instance with inotify_init(), which is inheritable: every agent the
    local launcher spawns (posix_spawn closes nothing) would hold it open, could read the
    daemon's events away, and one outliving a re-arm would keep an instance of the user's
    limit (128) alive. watchdog has no public name for the descriptor, so it is found as the
    kernel names it, in /proc/self/fd.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                os.set_inheritable(fd, False)
        except OSError:  # the listing's own fd, or one closed since
            continue


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's observer thread: each event goes to the loop, nothing else."""

    def __init__(self, watcher: Watcher, generation: int) -> None:
        self._watcher = watcher
        self._generation = generation

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        try:
            self._watcher.loop.call_soon_threadsafe(callback, self._generation, *args)
        except RuntimeError:  # the loop is closed: the daemon is gone, and so is the watch
            pass

    def on_closed(self, event: FileClosedEvent) -> None:
        self._post(self._watcher.arrived, os.fsdecode(event.src_path), "closed")

    def on_moved(self, event: DirMovedEvent | FileMovedEvent) -> None:
        if event.dest_path and not event.is_directory:  # "": moved out of the directory
            self._post(self._watcher.arrived, os.fsdecode(event.dest_path), "moved")

    def on_deleted(self, event: FileSystemEvent) -> None:
        if os.fsdecode(event.src_path) == str(self._watcher.directory):
            self._post(self._watcher.lost)

    def on_events_lost(self, event: EventsLostEvent) -> None:
        self._post(self._watcher.overflowed)


class Watcher:
    """The inotify watch as a context manager: armed on enter, stopped (every thread and fd)
    on exit.

    `on_rescan` is called (on the loop) when events were lost: a queue overflow, the directory
    itself went away, or the consumer failed on one. `rearm()` then watches the directory as it
    is now; when the kernel's inotify limits refuse a watch, `degraded` says why and only scans
    find files. Events from a watch that was re-armed or closed since are dropped on the loop.
    """

    def __init__(
        self,
        directory: Path,
        loop: asyncio.AbstractEventLoop,
        on_path: OnPath,
        on_rescan: Callable[[], None],
    ) -> None:
        self.directory = directory
        self.loop = loop
        self.degraded: str | None = None
        """Why inotify is not watching (its limits); None while it is."""
        self._on_path = on_path
        self._on_rescan = on_rescan
        self._observer: InotifyObserver | None = None
        self._generation = 0
        self._watched: tuple[int, int] | None = None
        self._gone = False
        self._closed = False

    def __enter__(self) -> Watcher:
        self.rearm()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed = True
        self._disarm()

    def rearm(self) -> None:
        """Watch the directory as it is at its path now (FileNotFoundError if it is not there).

        Hitting the inotify instance or watch limit (EMFILE, ENOSPC) is not fatal: the watcher
        is then `degraded`, logged once, and the daemon finds files by scanning more often.
        """
        if self._closed:
            return
        self._disarm()
        info = os.stat(self.directory)
        self._gone = False
        try:
            self._arm()
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
        self._watched = (info.st_dev, info.st_ino)

    def _arm(self) -> None:
        self._generation += 1
        observer = InotifyObserver(generate_full_events=True)  # moves in as moves, not creates
        try:
            # Symlinks are followed, as os.stat in stale() does (a results dir may be a link).
            observer.schedule(
                _Handler(self, self._generation), str(self.directory), recursive=False,
                event_filter=_EVENTS, follow_symlink=True,
            )  # fmt: skip
            _close_inotify_on_exec()
            observer.start()
        except BaseException:
            _stop(observer)
            raise
        self._observer = observer

    def stale(self) -> bool:
        """Whether the watch no longer covers the directory at its path (FileNotFoundError if
        there is none): it was deleted, moved away or replaced, inotify refused it, or
        watchdog's threads are no longer reading it."""
        info = os.stat(self.directory)
        observer = self._observer
        return (
            self._gone
            or observer is None
            or not observer.is_alive()
            or not all(emitter.is_alive() for emitter in observer.emitters)
            or self._watched != (info.st_dev, info.st_ino)
        )

    # -- on the loop, from the handler ------------------------------------------------------

    def arrived(self, generation: int, path: str, source: str) -> None:
        if generation != self._generation or self._observer is None:
            return
        file = Path(path)
        if file.parent != self.directory or not is_candidate(file.name):
            return
        try:
            self._on_path(file, source)
        except Exception:
            # The watch itself is fine; the file the consumer failed on is found by a rescan.
            log.exception("watcher.failed", file=file.name, action="rescanning")
            self._on_rescan()

    def lost(self, generation: int) -> None:
        # The directory was deleted or unmounted: nothing more arrives for its path. A flag
        # (read by stale()), and a rescan at once.
        if generation == self._generation and self._observer is not None and not self._gone:
            self._gone = True
            self._on_rescan()

    def overflowed(self, generation: int) -> None:
        if generation == self._generation and self._observer is not None:
            log.warning("watcher.overflow", action="rescanning")
            self._on_rescan()

    def _disarm(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            _stop(observer)

    def scan(self, skip: Container[str] = ()) -> list[Path]:
        """Candidate result files now in the directory, oldest first, except names in `skip`.

        Only the names not skipped are stat'ed: with 100,000 decided files a rescan is one
        directory listing, not 100,000 system calls. Any thread may call it.
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


def _stop(observer: InotifyObserver) -> None:
    """Stop the observer's threads and close its inotify instance, started or not."""
    observer.stop()
    if observer.is_alive():
        observer.join()
