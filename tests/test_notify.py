"""The sd_notify protocol against a real datagram socket standing in for systemd's."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from prng_daemon.service.notify import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A bound AF_UNIX datagram socket, as systemd listens on for a Type=notify service."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.setblocking(False)
        yield sock


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on `sock` (a local send is queued before it returns)."""
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """`environ(NAME=value, ...)`: the variables systemd gives a service, only these set
    (sdnotify reads $NOTIFY_SOCKET from os.environ)."""

    def set_environ(**env: str) -> None:
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            if name in env:
                monkeypatch.setenv(name, env[name])
            else:
                monkeypatch.delenv(name, raising=False)

    return set_environ


@pytest.fixture
def notifier(notify_socket: socket.socket, environ: Callable[..., None]) -> Callable[..., Notifier]:
    """A Notifier made under $NOTIFY_SOCKET=`notify_socket` and the other variables given."""

    def make(**env: str) -> Notifier:
        environ(NOTIFY_SOCKET=notify_socket.getsockname(), **env)
        return Notifier()

    return make


def test_ready_arrives_with_its_status(
    notify_socket: socket.socket, notifier: Callable[..., Notifier]
) -> None:
    notifier().ready(status="watching /srv/prng/results")

    assert received(notify_socket) == ["READY=1\nSTATUS=watching /srv/prng/results"]


def test_status_is_sent_only_when_it_changes(
    notify_socket: socket.socket, notifier: Callable[..., Notifier]
) -> None:
    n = notifier()
    n.ready(status="loading models")
    n.status("loading models")
    n.status("step 2: deciding")
    n.status("step 2: deciding")
    n.status("loading models")

    assert received(notify_socket) == [
        "READY=1\nSTATUS=loading models",
        "STATUS=step 2: deciding",
        "STATUS=loading models",
    ]


def test_status_newline_cannot_smuggle_another_assignment(
    notify_socket: socket.socket, notifier: Callable[..., Notifier]
) -> None:
    """Status text may carry a result file's name; a newline in it must not add MAINPID= etc."""
    notifier().status("deciding evil\nMAINPID=1.json")

    assert received(notify_socket) == ["STATUS=deciding evil MAINPID=1.json"]


def test_stopping_reloading_extend_timeout_and_watchdog(
    notify_socket: socket.socket, notifier: Callable[..., Notifier]
) -> None:
    n = notifier()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.extend_timeout(90)
    n.watchdog()
    n.stopping()

    reloading, extend, ping, stopping = received(notify_socket)
    assert reloading.splitlines()[0] == "RELOADING=1"
    key, _, usec = reloading.splitlines()[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    assert extend == "EXTEND_TIMEOUT_USEC=90000000"
    assert ping == "WATCHDOG=1"
    assert stopping == "STOPPING=1"


def test_abstract_namespace_socket(tmp_path: Path, environ: Callable[..., None]) -> None:
    name = f"prng-llm-daemon-test-{os.getpid()}-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        environ(NOTIFY_SOCKET="@" + name)
        Notifier().ready()

        assert received(sock) == ["READY=1"]


@pytest.mark.parametrize("under_systemd", [False, True])
def test_outside_systemd_or_disabled_every_call_is_a_silent_no_op(
    notify_socket: socket.socket, environ: Callable[..., None], under_systemd: bool
) -> None:
    """No $NOTIFY_SOCKET; or one, and the demo's `enabled=False`."""
    if under_systemd:
        environ(NOTIFY_SOCKET=notify_socket.getsockname(), WATCHDOG_USEC="200000")
    else:
        environ(WATCHDOG_USEC="200000")
    n = Notifier(enabled=not under_systemd)
    with capture_logs() as logs:
        n.ready(status="x")
        n.status("y")
        n.reloading()
        n.extend_timeout(1)
        n.watchdog()
        n.stopping()
        asyncio.run(asyncio.wait_for(n.watchdog_loop(), timeout=5))

    assert (n.enabled, n.watchdog_interval) == (False, None)
    assert logs == []
    assert received(notify_socket) == []


# sdnotify 0.3.2 drops its socket unclosed when the connect fails (CPython closes it at once:
# no descriptor is lost, only the warning is said).
SDNOTIFY_FAILED_CONNECT = pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning")


@SDNOTIFY_FAILED_CONNECT
def test_unreachable_socket_warns_once_and_never_raises(
    tmp_path: Path, environ: Callable[..., None]
) -> None:
    environ(NOTIFY_SOCKET=str(tmp_path / "gone"), WATCHDOG_USEC="200000")
    n = Notifier()
    with capture_logs() as logs:
        n.ready()
        n.watchdog()
        n.status("still here")

    assert [(e["event"], e["log_level"]) for e in logs] == [("notify.failed", "warning")]
    assert logs[0]["socket"] == str(tmp_path / "gone")


def test_watchdog_interval_is_half_of_watchdog_usec(notifier: Callable[..., Notifier]) -> None:
    assert notifier(WATCHDOG_USEC="30000000").watchdog_interval == 15.0
    assert notifier().watchdog_interval is None
    assert notifier(WATCHDOG_USEC="junk").watchdog_interval is None
    mine = str(os.getpid())
    assert notifier(WATCHDOG_USEC="200000", WATCHDOG_PID=mine).watchdog_interval
    # The environment was meant for another process (we inherited it): that one pings, not us.
    other = notifier(WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid() + 1))
    assert other.watchdog_interval is None


async def _ping_times(sock: socket.socket, count: int, deadline: float) -> list[float]:
    """Arrival times of the next `count` datagrams on `sock`, read by this event loop."""
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def collect() -> None:
        while len(times) < count:
            assert await loop.sock_recv(sock, 4096) == b"WATCHDOG=1"
            times.append(time.monotonic())

    await asyncio.wait_for(collect(), timeout=deadline)
    return times


def test_watchdog_pings_at_half_the_watchdog_interval(
    notify_socket: socket.socket, notifier: Callable[..., Notifier]
) -> None:
    n = notifier(WATCHDOG_USEC="200000")

    async def main() -> list[float]:
        pinger = asyncio.create_task(n.watchdog_loop())
        try:
            return await _ping_times(notify_socket, count=11, deadline=10)
        finally:
            pinger.cancel()

    times = asyncio.run(main())
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # 10 gaps of 0.1 s: late pings (a busy 2-core machine) are tolerated, early ones are not.
    assert 0.9 <= times[-1] - times[0] <= 1.6, gaps
    assert min(gaps) >= 0.08, gaps


def test_blocked_event_loop_stops_the_pings(
    notify_socket: socket.socket, notifier: Callable[..., Notifier]
) -> None:
    """The point of pinging from the loop: a wedged loop lets systemd's watchdog fire."""
    n = notifier(WATCHDOG_USEC="100000")

    async def main() -> tuple[list[str], list[float]]:
        pinger = asyncio.create_task(n.watchdog_loop())
        try:
            await _ping_times(notify_socket, count=1, deadline=5)
            received(notify_socket)
            time.sleep(0.5)  # the wedge under test, not synchronisation: 10 intervals long
            during = received(notify_socket)
            after = await _ping_times(notify_socket, count=2, deadline=5)
            return during, after
        finally:
            pinger.cancel()

    during, after = asyncio.run(main())
    assert during == []
    assert len(after) == 2


def test_status_is_sent_as_utf8(
    notify_socket: socket.socket, notifier: Callable[..., Notifier]
) -> None:
    """sdnotify encodes Latin-1; systemd ignores a STATUS= that is not UTF-8, and a character
    beyond Latin-1 would raise. The status line has `·` and file names have anything."""
    n = notifier()
    n.status("idle · ré→sumé.json")
    n.status("deciding bad\udcff.json")  # a name's undecodable byte, as os.fsdecode keeps it

    assert received(notify_socket) == [
        "STATUS=idle · ré→sumé.json",
        "STATUS=deciding bad\\udcff.json",
    ]


@SDNOTIFY_FAILED_CONNECT
def test_a_failed_send_is_retried_by_the_next_call(
    tmp_path: Path, environ: Callable[..., None]
) -> None:
    """systemd's socket was not there, then it is: the next call reaches it (sdnotify alone
    would keep its failed connection forever); a new failing streak is said again."""
    path = tmp_path / "notify"
    environ(NOTIFY_SOCKET=str(path))
    n = Notifier()
    with capture_logs() as logs:
        n.watchdog()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(path))
            sock.setblocking(False)
            n.watchdog()
            assert received(sock) == ["WATCHDOG=1"]
        path.unlink()
        n.watchdog()

    assert [e["event"] for e in logs] == ["notify.failed", "notify.failed"]


def test_a_full_notify_queue_never_blocks(
    notify_socket: socket.socket, notifier: Callable[..., Notifier]
) -> None:
    """Nobody reads the socket (systemd stuck): the sends fail at once, the caller goes on."""
    n = notifier()
    with capture_logs() as logs:
        pinger = threading.Thread(target=lambda: [n.watchdog() for _ in range(5000)])
        pinger.start()
        pinger.join(timeout=30)  # a deadline for a blocked send, not synchronisation

    assert not pinger.is_alive(), "a send blocked on the full queue"
    assert [e["event"] for e in logs] == ["notify.failed"]
    assert "unavailable" in logs[0]["error"]
