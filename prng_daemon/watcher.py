"""Watch the results directory: completed files in, as paths on the asyncio loop.

React to close-after-write and to renames/moves into the directory, never to `created`
(a file being copied is created long before it is complete). The watcher alone is never
trusted: the kernel drops events on queue overflow and NFS writes from other hosts raise
none, so `scan()` lists the directory for a catch-up at start and periodically. A directory
that is deleted and made again takes its inotify watch with it: `stale()` notices, `rearm()`
watches the new one.

No thread: watchdog's inotify instance is read by the loop itself when its fd is readable
(`loop.add_reader`), so an event reaches the daemon without waking any other thread. So the
watch is armed (`rearm()`) and closed (the exit) on the loop's thread; `scan()` may run anywhere.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Container
from pathlib import Path
from types import TracebackType

from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyConstants,
    InotifyEvent,
    InotifyFD,
    Mask,
    WatchDescriptor,
)

from .document.names import utf8_name
from .log import get_logger

__all__ = ["Watcher", "inotify_fd", "is_candidate"]

OnPath = Callable[[Path, str], None]

log = get_logger()

_FILE_IN = InotifyConstants.IN_CLOSE_WRITE | InotifyConstants.IN_MOVED_TO
_SELF_GONE = InotifyConstants.IN_DELETE_SELF | InotifyConstants.IN_MOVE_SELF
_MASK = Mask(_FILE_IN | _SELF_GONE | InotifyConstants.IN_ONLYDIR)
"""Closed after writing and moved in, never created; and the directory itself going away.
Symlinks are followed, as os.stat in stale() does (a results dir may be a link)."""
_CALLBACK_ID = CallbackId(0)


def is_candidate(name: str) -> bool:
    """A result file name: `*.json`, not hidden, not an editor's or copier's temp file."""
    return (
        name.endswith(".json")
        and not name.startswith((".", "#", "~"))
        and ".tmp" not in name
        and ".part" not in name
    )


def inotify_fd(inotify: InotifyFD) -> int:
    """The inotify instance's file descriptor, for `loop.add_reader`.

    watchdog (7.1) has no public name for it: `_inotify_fd` is private, and
    tests/test_watcher.py fails loudly if a release renames it or stops being an inotify fd.
    """
    fd: int = inotify._inotify_fd
    return fd


class _Events:
    """watchdog's WatchCallback for one armed watch; `handle_event` calls it on the loop."""

    def __init__(
        self, directory: Path, on_path: OnPath, on_lost: Callable[[], None],
        on_rescan: Callable[[], None],
    ) -> None:  # fmt: skip
        self._dir = directory
        self._on_path = on_path
        self._on_lost = on_lost
        self._on_rescan = on_rescan
        self.live = True
        """False once the watch is lost or closed: later events are not for this path."""

    def on_event(self, event: InotifyEvent) -> None:
        mask = event.mask
        if not self.live:
            return
        if mask & _SELF_GONE:  # before IN_ISDIR: recent kernels set it on these too
            self.on_watch_deleted(event.wd)
        elif mask & _FILE_IN and not mask & InotifyConstants.IN_ISDIR:
            name = os.fsdecode(event.name)
            if is_candidate(name):
                source = "closed" if mask & InotifyConstants.IN_CLOSE_WRITE else "moved"
                self._on_path(self._dir / name, source)

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        # The directory was deleted, unmounted or moved away: nothing more arrives for its path.
        if self.live:
            self.live = False
            self._on_lost()

    def on_queue_overflow(self) -> None:
        if self.live:
            log.warning("watcher.overflow", action="rescanning")
            self._on_rescan()


class Watcher:
    """The inotify watch as a context manager: armed on enter, closed (every fd) on exit.

    `on_rescan` is called (on the loop) when events were lost: a queue overflow, the directory
    itself went away, or reading the events failed. `rearm()` then watches the directory as it
    is now; when the kernel's inotify limits refuse a watch, `degraded` says why and only scans
    find files.
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
        self._inotify: InotifyFD | None = None
        self._events: _Events | None = None
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
        self._check_loop()
        self._closed = True
        self._disarm()

    def rearm(self) -> None:
        """Watch the directory as it is at its path now (FileNotFoundError if it is not there).

        Hitting the inotify instance or watch limit (EMFILE, ENOSPC) is not fatal: the watcher
        is then `degraded`, logged once, and the daemon finds files by scanning more often.
        """
        self._check_loop()
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
        inotify = InotifyFD()  # EMFILE, ENFILE: no inotify instance left
        try:
            # Never started, so no thread of watchdog's can be inside a read: close() may free
            # the fds itself (for a started one it leaves that to the reader thread).
            inotify._is_reading = False
            # watchdog's inotify_init() makes an inheritable fd: every agent the local launcher
            # spawned would hold this instance open (and could read its events), and each one
            # outliving a re-arm would keep an instance of the user's inotify limit (128) alive.
            os.set_inheritable(inotify_fd(inotify), False)
            events = _Events(self.directory, self._on_path, self._lost, self._on_rescan)
            inotify.add_callback(os.fsencode(self.directory), _MASK, events, _CALLBACK_ID)
            self._loop.add_reader(inotify_fd(inotify), self._readable, inotify)
        except BaseException:
            inotify.close()
            raise
        self._inotify, self._events = inotify, events

    def stale(self) -> bool:
        """Whether the watch no longer covers the directory at its path (FileNotFoundError if
        there is none): it was deleted, moved away or replaced, or inotify refused it."""
        info = os.stat(self.directory)
        return self._gone or self._inotify is None or self._watched != (info.st_dev, info.st_ino)

    def _lost(self) -> None:
        # Events will be missed from now on: a flag (read by stale()), and a rescan at once.
        self._gone = True
        self._on_rescan()

    def _readable(self, inotify: InotifyFD) -> None:
        try:
            for event in inotify.read_events():
                inotify.handle_event(event)
        except Exception:
            # Left registered, a fd that stays readable would fail again at once, forever, and
            # files would wait for the periodic scan: drop the watch, rescan and re-arm now.
            log.exception("watcher.failed", directory=str(self.directory), action="rescanning")
            self._disarm()
            self._lost()

    def _disarm(self) -> None:
        if self._inotify is not None and self._events is not None:
            self._events.live = False  # close() reports the watch deleted: that is no loss
            self._loop.remove_reader(inotify_fd(self._inotify))
            self._inotify.close()
            self._inotify = self._events = None

    def _check_loop(self) -> None:
        # add_reader/remove_reader are not thread-safe: from a worker thread they would race
        # the running loop's own use of its selector. Refuse that loudly, not fail now and then.
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is not self._loop and self._loop.is_running():
            raise RuntimeError("a Watcher is armed and closed on its loop's thread only")

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
