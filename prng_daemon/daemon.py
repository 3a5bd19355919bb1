"""Wires the parts into the running service: supervisor, watcher, ledger, engine, systemd.

One asyncio loop owns everything. Signals only set flags here; the main loop acts on them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import SERVER_NAMES as SERVERS
from .config import Config
from .engine import Engine
from .errors import ConfigError
from .handlers.act import Launcher
from .handlers.record import write_json_atomic
from .ledger import OUTCOMES, TRANSIENT, Ledger, State
from .llm.decision import Decision, DecisionEngine
from .llm.router import AsyncRouter
from .log import get_logger
from .metadata import AgentMetadata
from .supervisor import ChildState, ChildStatus, Supervisor
from .systemd import Notifier
from .watcher import Watcher

__all__ = ["Daemon", "status_path"]

HEARTBEAT_SECONDS = 2.0
STATUS_POLL_SECONDS = 0.25
COMMAND_POLL_SECONDS = 1.0
STOP_GRACE_SECONDS = 30.0
BUSY_RETRY_SECONDS = 0.2

log = get_logger()


def status_path(config: Config) -> Path:
    """Where the running daemon publishes its state for `prng-llm-daemon status`."""
    return config.daemon.state_dir / "status.json"


class Daemon:
    def __init__(
        self,
        config: Config,
        notifier: Notifier,
        reload_config: Callable[[], Config] | None = None,
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
        self._slot_count = sum(config.server(n).parallel for n in SERVERS)
        self._llm_slots = asyncio.Semaphore(self._slot_count)
        self._workers = max(4, 2 * self._slot_count)
        self._busy: set[asyncio.Task[Any]] = set()
        self._draining = False
        settings = config.daemon
        for directory in (settings.results_dir, settings.state_dir, settings.decisions_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(settings.ledger_path)
        self.supervisor = Supervisor(config, on_change=self._server_changed)
        self.router = AsyncRouter(config, is_ready=self.supervisor.is_ready)
        self._decisions = DecisionEngine(config, self.router)
        self.engine = Engine(
            config,
            self.ledger,
            self._decide,
            lambda on_exit: Launcher(
                settings.state_dir / "launches", settings.logs_dir / "agents", on_exit
            ),
            on_change=self._changed,
        )

    # -- plumbing between the parts ------------------------------------------------------

    def request_stop(self) -> None:
        """Stop as on SIGTERM (the demo and tests use this)."""
        self._stop.set()

    def enqueue(self, path: Path, source: str) -> None:
        """Called on the loop (the watcher hands over with call_soon_threadsafe)."""
        if path not in self._queued:
            self._queued.add(path)
            self._queue.put_nowait((path, source))

    def _changed(self, *_: Any) -> None:
        self._status_dirty = True

    async def _decide(self, meta: AgentMetadata) -> Decision:
        states = {s.state for s in self.supervisor.status().values()}
        if ChildState.READY not in states and {ChildState.STARTING, ChildState.STOPPED} & states:
            # Models still loading are not models that are down: wait for them rather than let
            # the rules policy decide every file that was waiting at start-up (or at a reload).
            longest = max(self.config.server(n).startup_timeout_seconds for n in SERVERS)
            await self.supervisor.wait_ready(longest)
        async with self._llm_slots:
            return await self._decisions.decide(meta)

    # -- the main loop ---------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        settings = self.config.daemon
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)
        tasks: list[asyncio.Task[Any]] = []
        try:
            with Watcher(settings.results_dir, loop, self.enqueue, self._rescan_now.set) as watcher:
                self.engine.reconcile()
                await self._catch_up(watcher, at_start=True)
                log.info("daemon.started", results_dir=str(settings.results_dir), pid=os.getpid())
                # READY as soon as the daemon serves: models may take minutes to load, and
                # STATUS= says so (TimeoutStartSec need not cover a 14B model load).
                self._notifier.ready(self.status_line())
                await self.supervisor.start()
                workers = [loop.create_task(self._worker()) for _ in range(self._workers)]
                tasks = workers + [
                    loop.create_task(self._rescan_loop(watcher)),
                    loop.create_task(self._command_loop()),
                    loop.create_task(self._status_loop()),
                    loop.create_task(self._notifier.watchdog_loop()),
                ]
                await self._stop.wait()
                log.info("daemon.stopping")
                self._notifier.stopping()
                await self._drain(workers)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.supervisor.stop()
            await self.engine.launcher.stop()
            await self.router.aclose()
            self._write_status(stopped=True)
            self.ledger.close()
            log.info("daemon.stopped")
        return 0

    async def _drain(self, workers: list[asyncio.Task[Any]]) -> None:
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

    async def _worker(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        while not self._draining:
            path, source = await self._queue.get()
            self._queued.discard(path)
            self._busy.add(task)
            try:
                if not await self.engine.process(path, source):
                    loop = asyncio.get_running_loop()
                    loop.call_later(BUSY_RETRY_SECONDS, self.enqueue, path, source)
            except Exception:
                log.exception("result.crashed", file=path.name)
            finally:
                self._busy.discard(task)

    async def _catch_up(self, watcher: Watcher, at_start: bool = False) -> None:
        # The listing runs off the loop; the set is only read there (membership tests).
        found = await asyncio.to_thread(watcher.scan, self.ledger.known_paths())
        for path in found:
            self.enqueue(path, "scan")
        # WAITING: no LLM answered last time. The sweep: rows left mid-way (at start, any).
        for entry in self.ledger.in_state(State.WAITING):
            self.enqueue(self.config.daemon.results_dir / entry.path, "retry")
        for path in self.engine.sweep(at_start=at_start):
            self.enqueue(path, "retry")
        if found:
            log.info("daemon.catch_up", files=len(found))

    async def _rescan_loop(self, watcher: Watcher) -> None:
        interval = self.config.daemon.rescan_interval_seconds
        while True:
            try:
                await asyncio.wait_for(self._rescan_now.wait(), interval)
                log.warning("watcher.overflow", action="rescanning")
            except TimeoutError:
                pass
            self._rescan_now.clear()
            await self._catch_up(watcher)

    async def _command_loop(self) -> None:
        while True:
            for command_id, run_id, verb in self.ledger.pending_commands():
                applied, message = await self.engine.resolve(run_id, verb)
                (log.info if applied else log.warning)("command.done", message=message)
                self.ledger.finish_command(command_id)
            if self._reload_requested:
                await self._reload()
            await asyncio.sleep(COMMAND_POLL_SECONDS)

    # -- reload, status ----------------------------------------------------------------------

    def _request_reload(self) -> None:
        self._reload_requested = True

    async def _reload(self) -> None:
        self._reload_requested = False
        if self._reload_config is None:
            return
        self._notifier.reloading()
        try:
            new = self._reload_config()
        except ConfigError as exc:
            log.error("config.reload_failed", problems=exc.problems, kept="the running config")
        else:
            changed = [n for n in SERVERS if new.server(n) != self.config.server(n)]
            self.config = new
            self.engine.config = new
            if changed:
                await self._restart_servers(new, changed)
            else:
                self._decisions = DecisionEngine(new, self.router)
            log.info("config.reloaded", servers_restarted=changed)
        self._notifier.ready(self.status_line())

    async def _restart_servers(self, config: Config, changed: list[str]) -> None:
        """New llama-server settings: restart those children with no decision in flight.

        Holding every LLM slot keeps decisions from starting against servers going away; they
        resume once the new children are up (and wait while the models load).
        """
        slots = self._llm_slots
        held = 0
        try:
            for _ in range(self._slot_count):
                await slots.acquire()
                held += 1
            log.info("servers.restarting", servers=changed, reason="config reloaded")
            await self.supervisor.reconfigure(config, changed)
            await self.router.aclose()
            self.router = AsyncRouter(config, is_ready=self.supervisor.is_ready)
            self._decisions = DecisionEngine(config, self.router)
            self._slot_count = sum(config.server(n).parallel for n in SERVERS)
            self._llm_slots = asyncio.Semaphore(self._slot_count)
        finally:
            for _ in range(held):
                slots.release()

    def _server_changed(self, status: ChildStatus) -> None:
        self._status_dirty = True

    def status_line(self) -> str:
        states = self.supervisor.status()
        # A server someone else runs has no child state here; saying "starting" would never end.
        servers = ", ".join(
            f"{name} {states[name].state.value}" if name in states
            else f"{name} {'starting' if self.config.server(name).managed else 'unmanaged'}"
            for name in ("orchestrator", "math")
        )  # fmt: skip
        counts = self.ledger.counts()
        decided = sum(counts.get(s, 0) for s in OUTCOMES)
        current = self.engine.current
        return (
            f"{servers} · {current} · {decided} decided, "
            f"{counts.get(State.ESCALATED, 0)} escalated, {self._queue.qsize()} queued"
        )

    async def _status_loop(self) -> None:
        """STATUS= and the status file when something changed; the file at least as a heartbeat."""
        last_write = 0.0
        while True:
            now = time.monotonic()
            if self._status_dirty or now - last_write >= HEARTBEAT_SECONDS:
                self._status_dirty = False
                self._notifier.status(self.status_line())
                self._write_status()
                last_write = now
            await asyncio.sleep(STATUS_POLL_SECONDS)

    def _write_status(self, stopped: bool = False) -> None:
        write_json_atomic(
            status_path(self.config),
            durable=False,
            document={
                "pid": os.getpid(),
                "started": self._started,
                "heartbeat": time.time(),
                "stopped": stopped,
                "status": self.status_line(),
                "servers": {
                    name: {
                        "state": s.state.value,
                        "pid": s.pid,
                        "restarts": s.restarts,
                        "last_exit": s.last_exit,
                        "since": s.since,
                        "message": s.message,
                    }
                    for name, s in self.supervisor.status().items()
                },
                "queued": self._queue.qsize(),
                "agents_running": self.engine.launcher.running,
            },
        )
