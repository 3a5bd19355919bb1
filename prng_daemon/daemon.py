"""Wires the parts into the running service: supervisor, watcher, ledger, engine, systemd.

One asyncio loop owns everything. Signals only set flags here; the main loop acts on them.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import gc
import os
import signal
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

from . import reload
from .commands import Commands
from .config import Config
from .document.decision import Decision
from .document.metadata import AgentMetadata
from .document.pipeline import SERVER_NAMES, ServerName
from .engine import Engine, Explaining
from .errors import ConfigError, DaemonError
from .handlers.act import choose_launcher, make_launcher
from .handlers.decide.policy import Decider, Unexplained
from .handlers.decide.vote import LedgerCases
from .ledger import OUTCOMES, TRANSIENT, Ledger, State
from .llm.router import AsyncRouter
from .log import get_logger
from .servers.gpu import where
from .servers.supervisor import ChildState, ChildStatus, Supervisor
from .service import status as status_file
from .service.notify import Notifier
from .service.tasks import Tasks
from .watcher import Watcher

__all__ = ["EXIT_TASK_FAILED", "Daemon", "lock_state_dir"]

STATUS_POLL_SECONDS = 0.25
STOP_GRACE_SECONDS = 30.0
BUSY_RETRY_SECONDS = 0.2
DEGRADED_RESCAN_SECONDS = 2.0
"""How often to scan while inotify cannot watch (its limits, or the directory is missing)."""
RETRY_SECONDS = (2.0, 30.0)
"""A file met by a fault that can clear is tried again after the first, doubling up to the
second (or the rescan interval, if shorter) while the fault lasts."""
STATUS_DEADLINE_SECONDS = 30.0
EXIT_TASK_FAILED = 1

log = get_logger()


def lock_state_dir(state_dir: Path) -> int:
    """Take `state_dir/daemon.lock` (flock) for this process; its fd, held until exit.

    Two daemons on one state dir would both decide every file. The lock dies with the
    process (even on SIGKILL), and agents do not inherit it (the fd is close-on-exec).
    """
    path = state_dir / "daemon.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            os.close(fd)
            raise
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DaemonError(
            f"another prng-llm-daemon (pid {holder}) is running on state dir {state_dir}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _server_line(name: str, status: ChildStatus) -> str:
    """`math ready on GPU1, 5.4 GiB`; a failed or restarting one with its reason (`math failed:
    on CPU — GPU 1 not found`), the one place systemctl status can say why."""
    if status.state in (ChildState.FAILED, ChildState.BACKOFF):
        return f"{name} {status.state.value}: {status.message}"
    placed = where(status.placement, status.vram_mib)
    return f"{name} {status.state.value}" + (f" {placed}" if placed else "")


def work_deadline(config: Config) -> float:
    """The longest a healthy worker may spend on one file (or the command loop on a reload):
    the models loading, then waiting for an LLM slot and every request of one decision
    (two models, each with its fallback and answer attempts) at the request timeout."""
    loading = max(config.server(n).startup_timeout_seconds for n in SERVER_NAMES)
    decision = config.routing.request_timeout_seconds * config.policy.answer_attempts * 4
    return loading + 2 * decision + 60.0


class Daemon:
    def __init__(
        self,
        config: Config,
        notifier: Notifier,
        reload_config: Callable[[], Config] | None = None,
    ) -> None:
        settings = config.daemon
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        # Before anything else: a second daemon must not even open the ledger.
        self._lock = lock_state_dir(settings.state_dir)
        try:
            self._setup(config, notifier, reload_config)
        except BaseException:
            os.close(self._lock)
            raise

    def _setup(
        self, config: Config, notifier: Notifier, reload_config: Callable[[], Config] | None
    ) -> None:
        self.config = config
        self._notifier = notifier
        self._reload_config = reload_config
        self._queue: asyncio.Queue[tuple[Path, str]] = asyncio.Queue()
        self._queued: set[Path] = set()
        self._stop = asyncio.Event()
        self._rescan_now = asyncio.Event()
        self._reload_requested = False
        self._status_dirty = True
        self._started = time.time()
        self._slot_count = sum(config.server(n).parallel for n in SERVER_NAMES)
        self._llm_slots = asyncio.Semaphore(self._slot_count)
        self._workers = max(4, 2 * self._slot_count)
        self._busy: set[asyncio.Task[Any]] = set()
        self._draining = False
        self._tasks = Tasks()
        self._watcher: Watcher | None = None
        self._watching = ExitStack()
        """Holds the running watcher: entered by `run`, its watcher swapped by a reload."""
        self._retry: set[Path] = set()
        """Files a fault that can clear stopped (a full disk, no fd left): tried again soon."""
        self._retry_timer: asyncio.TimerHandle | None = None
        self._retry_delay = RETRY_SECONDS[0]
        self._fault_since: float | None = None
        """When the current episode of such faults began (said once, and once when over)."""
        settings = config.daemon
        for directory in (settings.results_dir, settings.decisions_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(settings.ledger_path)
        try:  # a launcher that cannot work refuses the start before anything runs
            self.launcher_choice = choose_launcher(settings)
        except ConfigError:
            self.ledger.close()
            raise
        self.supervisor = Supervisor(config, on_change=self._server_changed)
        self.router = AsyncRouter(config, is_ready=self.supervisor.is_ready)
        self._cases = LedgerCases(self.ledger)
        self._decisions = Decider(config, self.router, self._cases)
        self.engine = Engine(
            config,
            self.ledger,
            self._decide,
            lambda on_exit: make_launcher(settings, self.launcher_choice, on_exit),
            on_change=self._changed,
            requeue=self.enqueue,
        )
        self._commands = Commands(self.engine, on_change=self._changed)

    # -- plumbing between the parts ------------------------------------------------------

    def request_stop(self) -> None:
        """Stop as on SIGTERM (the demo and tests use this)."""
        self._stop.set()

    def enqueue(self, path: Path, source: str) -> None:
        """Called on the loop (the watcher hands its events there)."""
        if path not in self._queued:
            self._queued.add(path)
            self._queue.put_nowait((path, source))

    def _changed(self, *_: Any) -> None:
        self._status_dirty = True

    async def _decide(
        self, meta: AgentMetadata, payload: Mapping[str, Any]
    ) -> Decision | Explaining:
        states = {s.state for s in self.supervisor.status().values()}
        if ChildState.READY not in states and {ChildState.STARTING, ChildState.STOPPED} & states:
            # Models still loading are not models that are down: wait for them rather than let
            # the rules policy decide every file that was waiting at start-up (or at a reload).
            longest = max(self.config.server(n).startup_timeout_seconds for n in SERVER_NAMES)
            await self.supervisor.wait_ready(longest)
        slots, decisions = self._llm_slots, self._decisions
        await slots.acquire()
        try:
            taken = await decisions.take(meta, payload)
        except BaseException:
            slots.release()
            raise
        if not isinstance(taken, Unexplained):
            slots.release()
            return taken
        # The explanation is asked for at once, in the same slot (the server's cache of this
        # file's prompt is still warm), while the engine acts on the decision: the launch does
        # not wait for it. The slot is free again when it ends, however it ends.
        explaining = asyncio.get_running_loop().create_task(decisions.explain(taken))
        explaining.add_done_callback(lambda _: slots.release())
        return Explaining(taken.decision, explaining)

    # -- the main loop ---------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM (0), or until a task of its own cannot be kept running (1)."""
        loop = asyncio.get_running_loop()
        settings = self.config.daemon
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)
        code = 0
        try:
            # The watcher stops when this block ends: the one given back by a reload too
            # (`_swap` moves it into this stack, and the old one out).
            with self._watching:
                try:
                    self._watcher = self._watching.enter_context(self._watch(settings.results_dir))
                    self.engine.recovery.reconcile(self.config)
                    await self._catch_up(at_start=True)
                    # What start-up made (modules, schemas, the config) lives as long as the daemon:
                    # frozen, the collector never walks it again. Its full passes were the latency
                    # tail (a file's p99 8.2 -> 7.1 ms, the worst 17.5 -> 8.2 ms; RESULTS §1).
                    gc.collect()
                    gc.freeze()
                    log.info(
                        "daemon.started", results_dir=str(settings.results_dir), pid=os.getpid()
                    )
                    # READY as soon as the daemon serves: models may take minutes to load, and
                    # STATUS= says so (TimeoutStartSec need not cover a 14B model load).
                    self._notifier.ready(self.status_line())
                    await self.supervisor.start()
                    workers = self._start_tasks()
                    stop = loop.create_task(self._stop.wait())
                    failed = loop.create_task(self._tasks.failed.wait())
                    await asyncio.wait({stop, failed}, return_when=asyncio.FIRST_COMPLETED)
                    stop.cancel()
                    failed.cancel()
                    if self._tasks.failed.is_set():
                        log.error("daemon.failed", reason=self._tasks.failure)
                        code = EXIT_TASK_FAILED
                    log.info("daemon.stopping")
                    self._notifier.stopping()
                    await self._drain(workers)
                finally:
                    if self._retry_timer is not None:
                        self._retry_timer.cancel()
                    await self._tasks.stop()
                    await self.supervisor.stop()
                    await self.engine.launcher.stop()
                    await self.router.aclose()
        finally:
            try:
                self._write_status(self.status_line(), stopped=True)
            except OSError as exc:
                log.error(
                    "status.write_failed",
                    file=str(status_file.status_path(self.config)),
                    error=str(exc),
                )
            self.ledger.close()
            os.close(self._lock)
            log.info("daemon.stopped", exit_code=code)
        return code

    def _start_tasks(self) -> list[asyncio.Task[None]]:
        """Every long-lived task, supervised; the workers are returned for the drain."""
        tasks = self._tasks
        work = work_deadline(self.config)
        workers = [
            tasks.start(f"worker-{n}", partial(self._worker, f"worker-{n}"), work)
            for n in range(self._workers)
        ]
        tasks.start("rescan", self._rescan_loop, self._rescan_deadline())
        beat = partial(tasks.beat, "commands")
        tasks.start("commands", partial(self._commands.serve, beat, self._reload), work)
        tasks.start("status", self._status_loop, STATUS_DEADLINE_SECONDS)
        # The pinger checks the others; if it is stuck itself, the pings stop all the same.
        tasks.start(
            "watchdog",
            partial(self._notifier.watchdog_loop, tasks.problems, self.status_line),
            None,
        )
        return workers

    def _rescan_deadline(self) -> float:
        return self.config.daemon.rescan_interval_seconds + 120.0

    async def _drain(self, workers: list[asyncio.Task[None]]) -> None:
        """Let in-flight files finish (bounded); queued ones stay unclaimed for the next start."""
        while not self._queue.empty():
            path, _ = self._queue.get_nowait()
            self._queued.discard(path)
        self._draining = True
        busy = [t for t in workers if t in self._busy]
        for task in workers:
            if task not in self._busy:
                task.cancel()
        if busy:
            log.info("daemon.draining", in_flight=len(busy))
            await asyncio.wait(busy, timeout=STOP_GRACE_SECONDS)
        for entry in self.ledger.in_state(*TRANSIENT):
            log.warning("result.interrupted", file=entry.path, state=entry.state.value)

    async def _worker(self, name: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        while not self._draining:
            self._tasks.idle(name)
            path, source = await self._queue.get()
            self._tasks.beat(name)
            self._queued.discard(path)
            if path.parent != self.config.daemon.results_dir:
                continue  # queued before a reload moved the results dir elsewhere
            self._busy.add(task)
            try:
                if not await self.engine.process(path, source):
                    loop = asyncio.get_running_loop()
                    loop.call_later(BUSY_RETRY_SECONDS, self.enqueue, path, source)
                else:
                    self._fault_over()
            except OSError as exc:
                # A fault that can clear (a full disk, no fd left, a vanished directory): the
                # file, with or without a row, is tried again in seconds.
                self._retry_later(path, exc)
            except Exception:
                # One file's bug must not take the worker (and every later file) with it.
                log.exception("result.crashed", file=path.name)
            finally:
                self._busy.discard(task)

    def _retry_later(self, path: Path, exc: OSError) -> None:
        """Try `path` again after the current delay; said once per episode."""
        if self._fault_since is None:
            self._fault_since = time.time()
            again = f"trying again in {self._retry_delay:g}s, then less often"
            log.warning("result.retry_later", file=path.name, error=str(exc), action=again)
        else:
            log.debug("result.retry_later", file=path.name, error=str(exc))
        self._retry.add(path)
        if self._retry_timer is None:
            loop = asyncio.get_running_loop()
            self._retry_timer = loop.call_later(self._retry_delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry_timer = None
        cap = min(RETRY_SECONDS[1], self.config.daemon.rescan_interval_seconds)
        self._retry_delay = min(2 * self._retry_delay, max(cap, RETRY_SECONDS[0]))
        paths, self._retry = self._retry, set()
        for path in paths:
            self.enqueue(path, "retry")

    def _fault_over(self) -> None:
        """A file went through: once none waits to be tried again, the episode is over."""
        if self._fault_since is None or self._retry or self._retry_timer is not None:
            return
        log.info("result.retry_recovered", since=round(time.time() - self._fault_since, 1))
        self._fault_since = None
        self._retry_delay = RETRY_SECONDS[0]

    async def _catch_up(self, at_start: bool = False) -> None:
        """Scan for files inotify did not report; FileNotFoundError if the dir is missing."""
        watcher = self._watcher
        assert watcher is not None
        if watcher.stale():
            rearmed = watcher.degraded is None
            watcher.rearm()
            if rearmed and watcher.degraded is None:
                log.info("watcher.rearmed", directory=str(watcher.directory))
        skip = self.ledger.known_paths()
        # Off the loop: the listing may be long. The skip set is only read there (membership
        # tests).
        found = await asyncio.to_thread(watcher.scan, skip)
        for path in found:
            self.enqueue(path, "scan")
        # WAITING: no LLM answered last time. The sweep: rows left mid-way (at start, any).
        for entry in self.ledger.in_state(State.WAITING):
            self.enqueue(self.config.daemon.results_dir / entry.path, "retry")
        for path in self.engine.recovery.sweep(self.config.daemon, at_start=at_start):
            self.enqueue(path, "retry")
        if found:
            log.info("daemon.catch_up", files=len(found))

    async def _rescan_loop(self) -> None:
        missing = failing = False
        while True:
            self._tasks.beat("rescan")
            assert self._watcher is not None
            interval = self.config.daemon.rescan_interval_seconds
            if missing or self._watcher.degraded is not None:
                interval = min(interval, DEGRADED_RESCAN_SECONDS)
            try:
                await asyncio.wait_for(self._rescan_now.wait(), interval)
            except TimeoutError:
                pass
            self._rescan_now.clear()
            self._tasks.beat("rescan")
            try:
                await self._catch_up()
            except FileNotFoundError:
                if not missing:
                    log.error(
                        "watcher.dir_missing", directory=str(self.config.daemon.results_dir),
                        action=f"looking for it every {DEGRADED_RESCAN_SECONDS:g}s",
                    )  # fmt: skip
                missing = True
                continue
            except OSError as exc:
                # A full disk: the sweep cannot write its rows; they wait for the next rescan.
                if not failing:
                    log.error("rescan.failed", error=str(exc), action="trying again each rescan")
                failing = True
                continue
            if failing:
                log.info("rescan.recovered")
            failing = False
            if missing:
                log.info("watcher.dir_back", directory=str(self.config.daemon.results_dir))
                self._changed()
            missing = False

    # -- reload, status ----------------------------------------------------------------------

    def _request_reload(self) -> None:
        self._reload_requested = True

    async def _reload(self) -> None:
        """Reload the config if SIGHUP asked for it (between two rounds of commands)."""
        if not self._reload_requested:
            return
        self._reload_requested = False
        if self._reload_config is None:
            return
        self._notifier.reloading()
        try:
            await self._apply_reload(self._reload_config)
        finally:
            self._notifier.ready(self.status_line())

    async def _apply_reload(self, read: Callable[[], Config]) -> None:
        """Build every part the new config needs, swap only if all of it succeeded."""
        kept = "the running config"
        try:
            new = read()
        except ConfigError as exc:
            log.error("config.reload_failed", problems=exc.problems, kept=kept)
            return
        refused = reload.restart_only_changes(self.config, new)
        if refused:
            reason = f"{', '.join(refused)} {'needs' if len(refused) == 1 else 'need'} a restart"
            log.error("config.reload_refused", keys=refused, reason=reason, kept=kept)
            return
        try:
            parts = await reload.build(
                self.config, new, self.supervisor.is_ready, self._watch, self._cases
            )
        except ConfigError as exc:
            log.error("config.reload_failed", problems=exc.problems, kept=kept)
            return
        except OSError as exc:
            problem = f"config: daemon.results_dir: cannot watch {new.daemon.results_dir}: {exc}"
            log.error("config.reload_failed", problems=[problem], kept=kept)
            return
        restarted = await self._swap(new, parts)
        log.info("config.reloaded", servers_restarted=restarted)

    def _watch(self, directory: Path) -> Watcher:
        loop = asyncio.get_running_loop()
        return Watcher(directory, loop, self.enqueue, self._rescan_now.set)

    async def _swap(self, new: Config, parts: reload.Parts) -> list[ServerName]:
        """Put the new parts in place; close the old ones. Returns the servers restarted.

        Holding every LLM slot first means no decision is in flight on the router being closed
        or against servers going away; waiting decisions resume on the new parts.
        """
        restart = reload.servers_to_restart(self.config, new)
        old_router, slots = self.router, self._llm_slots
        old_watching: ExitStack | None = None
        held = 0
        try:
            for _ in range(self._slot_count):
                await slots.acquire()
                held += 1
            if restart:
                log.info("servers.restarting", servers=restart, reason="config reloaded")
            await self.supervisor.reconfigure(new, restart)
            self.router, self._decisions = parts.router, parts.decisions
            self._slot_count = sum(new.server(n).parallel for n in SERVER_NAMES)
            self._llm_slots = asyncio.Semaphore(self._slot_count)
            self.config = new
            self.engine.reconfigure(new)
            if parts.watcher is not None:
                # The new watcher is already armed; the old one leaves the stack run() holds.
                self._watcher = parts.watcher
                old_watching = self._watching.pop_all()
                self._watching.enter_context(parts.watching)
        except BaseException:
            if self.router is not parts.router:
                await parts.router.aclose()
                parts.watching.close()
            raise
        finally:
            for _ in range(held):
                slots.release()
        await old_router.aclose()
        if old_watching is not None:
            old_watching.close()
        work = work_deadline(new)
        for n in range(self._workers):
            self._tasks.set_deadline(f"worker-{n}", work)
        self._tasks.set_deadline("commands", work)
        self._tasks.set_deadline("rescan", self._rescan_deadline())
        self._rescan_now.set()  # a new dir or interval: look now
        return restart

    def _server_changed(self, status: ChildStatus) -> None:
        self._status_dirty = True

    def status_line(self) -> str:
        states = self.supervisor.status()
        # A server someone else runs has no child state here; saying "starting" would never end.
        servers = ", ".join(
            _server_line(name, states[name]) if name in states
            else f"{name} {'starting' if self.config.server(name).managed else 'unmanaged'}"
            for name in SERVER_NAMES
        )  # fmt: skip
        counts = self.ledger.counts()
        decided = sum(counts.get(s, 0) for s in OUTCOMES)
        current = self.engine.current
        problems = self._tasks.problems()
        health = f"unhealthy: {'; '.join(problems)} · " if problems else ""
        if self._watcher is not None and self._watcher.degraded is not None:
            health += f"degraded: no inotify ({self._watcher.degraded}), scanning · "
        for outage in self.engine.launcher.outages():  # agents' states: as last seen
            health += f"degraded: {outage} · "
        return (
            f"{health}{servers} · {current} · {decided} decided, "
            f"{counts.get(State.ESCALATED, 0)} escalated, {self._queue.qsize()} queued"
        )

    async def _status_loop(self) -> None:
        """STATUS= and the status file when something changed; the file at least as a heartbeat.

        A status file that cannot be written (a full disk) is said once per episode; the loop
        goes on, and `status` reads the stale heartbeat as "not responding".
        """
        last_write = 0.0
        failing = False
        while True:
            self._tasks.beat("status")
            now = time.monotonic()
            if self._status_dirty or now - last_write >= status_file.HEARTBEAT_SECONDS:
                self._status_dirty = False
                line = self.status_line()
                self._notifier.status(line)
                last_write = now
                try:
                    self._write_status(line)
                except OSError as exc:
                    if not failing:
                        log.error(
                            "status.write_failed", file=str(status_file.status_path(self.config)),
                            error=str(exc),
                        )  # fmt: skip
                    failing = True
                else:
                    if failing:
                        log.info(
                            "status.write_recovered", file=str(status_file.status_path(self.config))
                        )
                    failing = False
            await asyncio.sleep(STATUS_POLL_SECONDS)

    def _write_status(self, line: str, stopped: bool = False) -> None:
        status_file.publish(
            self.config, started=self._started, line=line, stopped=stopped,
            servers=self.supervisor.status(), queued=self._queue.qsize(),
            launcher=self.engine.launcher, choice=self.launcher_choice,
        )  # fmt: skip
