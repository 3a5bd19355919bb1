"""sd_notify(3): READY / STATUS / RELOADING / STOPPING / WATCHDOG to systemd; a no-op outside it."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping

import sdnotify

from ..log import get_logger

__all__ = ["Notifier"]


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC in seconds, the ping period sd_watchdog_enabled(3) recommends."""
    pid = environ.get("WATCHDOG_PID")
    # systemd sets WATCHDOG_PID so that a child that inherited the environment does not ping.
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1e6 if usec > 0 else None


def _one_line(text: str) -> str:
    # A newline ends the assignment: a result file named "x\nMAINPID=1" must not become one.
    return " ".join(text.splitlines())


def _as_sent(text: str) -> str:
    """`text` as sdnotify must be handed it to send its UTF-8 bytes.

    sdnotify encodes what it sends as Latin-1: a character beyond it (`→`) cannot be sent, and
    one within it but not ASCII (`é`) would go as a byte systemd refuses (it ignores a STATUS=
    that is not UTF-8). So it is handed the UTF-8 bytes as the Latin-1 characters that encode
    back to exactly those bytes. A lone surrogate (a name's undecodable byte) goes as an escape.
    """
    return text.encode("utf-8", "backslashreplace").decode("latin-1")


class Notifier:
    """Talks to the service manager over $NOTIFY_SOCKET; every call is silent without one, or
    with `enabled=False` (the demo).

    One datagram per call through the `sdnotify` package, a fresh `SystemdNotifier` each time
    (as libsystemd's sd_notify() opens a socket per call), so a failed send is retried by the
    next call. Never raises, never blocks.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        # sdnotify reads $NOTIFY_SOCKET from os.environ itself: so does this.
        self._address = os.environ.get("NOTIFY_SOCKET", "") if enabled else ""
        self.enabled = bool(self._address)
        self.watchdog_interval = _watchdog_interval(os.environ) if self.enabled else None
        self._last_status: str | None = None
        self._failing = False

    def ready(self, status: str | None = None) -> None:
        lines = ["READY=1"]
        if status is not None:
            self._last_status = _one_line(status)
            lines.append(f"STATUS={self._last_status}")
        self._send(lines)

    def status(self, text: str) -> None:
        """Say `text` in `systemctl status`; repeats of the last text are not sent."""
        text = _one_line(text)
        if text == self._last_status:
            return
        self._last_status = text
        self._send([f"STATUS={text}"])

    def reloading(self) -> None:
        # systemd >= 253 (Type=notify-reload) wants the monotonic time with RELOADING=1 to tell
        # this reload from an older one; 252 ignores the extra field.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(["RELOADING=1", f"MONOTONIC_USEC={usec}"])

    def stopping(self) -> None:
        self._send(["STOPPING=1"])

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before the start/stop timeout, counted from now."""
        self._send([f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}"])

    def watchdog(self) -> None:
        self._send(["WATCHDOG=1"])

    async def watchdog_loop(
        self,
        problems: Callable[[], list[str]] = list,
        status_line: Callable[[], str] | None = None,
    ) -> None:
        """Ping WATCHDOG=1 every `watchdog_interval` while `problems()` is empty, until
        cancelled; return at once without a watchdog.

        WATCHDOG=1 means healthy, not merely "the loop turns": while `problems()` names a stuck
        or dead part, no ping is sent and STATUS= says why (`status_line()`, which should name
        the problems, else the problems alone), so systemd's WatchdogSec= restarts the daemon.
        The pings come from the event loop, not a thread, on purpose: a wedged loop stops
        pinging too.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        withheld = False
        while True:
            found = problems()
            if found:
                if not withheld:
                    get_logger().error("watchdog.withheld", problems=found)
                withheld = True
                self.status(status_line() if status_line else "unhealthy: " + "; ".join(found))
            else:
                if withheld:
                    get_logger().info("watchdog.resumed")
                withheld = False
                self.watchdog()
            await asyncio.sleep(interval)

    def _send(self, lines: list[str]) -> None:
        if not self.enabled:
            return
        try:
            # debug=True: a failed connect or send raises, for the warning below (else sdnotify
            # swallows it without a word).
            notifier = sdnotify.SystemdNotifier(debug=True)
            try:
                # Non-blocking: a full notify queue must cost a lost ping, never a stalled loop.
                notifier.socket.setblocking(False)
                notifier.notify(_as_sent("\n".join(lines)))
            finally:
                notifier.socket.close()  # no descriptor held between calls
        except OSError as exc:
            # Once per failing streak: a daemon that cannot notify must keep working, and must
            # not fill the journal with one warning per watchdog ping.
            if not self._failing:
                get_logger().warning("notify.failed", socket=self._address, error=str(exc))
            self._failing = True
            return
        self._failing = False
