"""Keeps the llama-server children up: launch, readiness, liveness, restart budget, no orphans."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, TypeVar

from structlog.typing import FilteringBoundLogger

from ..config import Config, ServerConfig
from ..document.pipeline import SERVER_NAMES, ServerName
from ..errors import LLMError
from ..llm.apikey import make_key
from ..llm.client import Health, LlamaClient
from ..log import get_logger
from . import gpu
from .backoff import RestartBudget
from .childlog import ChildLog
from .preflight import PreflightFailed, ServerLaunch, plan_launch
from .spawn import CRASH_SIGNALS, exit_text, signal_group, spawn

__all__ = ["ChildState", "ChildStatus", "Supervisor", "WrongPlacement"]

T = TypeVar("T")

_PROBE_PROMPT = "ok"
NO_REPACK = "--no-repack"
"""llama-server's safer way to load: weights used as stored, no repacking into an AMX buffer."""
STATUS_TAIL = 5
"""How many of a failed child's last lines `status` shows."""


class ChildState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ChildStatus:
    name: ServerName
    state: ChildState
    pid: int | None
    restarts: int
    last_exit: int | None
    """The last returncode; negative is the signal that ended it."""
    since: float
    """Wall-clock time.time() of the last state change."""
    message: str
    placement: str | None = None
    """Where its layers are: "GPU1" (its gpu_id), "CUDA0+CUDA1" (no gpu_id), "CPU"; None: not
    known (not launched yet, or a llama-server too old to list its devices)."""
    vram_mib: int | None = None
    """GPU memory its process holds (NVML or nvidia-smi); None without an NVIDIA driver."""
    tail: tuple[str, ...] = ()
    """A FAILED child's last lines of output (its last run's), for `status`."""


class WrongPlacement(Exception):
    """A child given a GPU would run, or runs, on the CPU; `reason` says which GPU and why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class _Ended:
    """How one run of a child ended."""

    how: str
    """`exited while loading the model (killed by SIGSEGV)`, `hung: ... (killed by SIGKILL)`."""
    last_line: str | None
    """What it said last, when it ended by itself."""
    crash: signal.Signals | None = None
    """The signal, when it crashed (CRASH_SIGNALS) before it was ever ready."""

    def reason(self, note: str = "") -> str:
        said = f'; its last line: "{self.last_line}"' if self.last_line else ""
        return f"{self.how}{note}{said}"


@dataclass
class _Child:
    name: ServerName
    log: FilteringBoundLogger
    budget: RestartBudget
    status: ChildStatus
    output: ChildLog | None = None
    proc: asyncio.subprocess.Process | None = None
    pump: asyncio.Task[None] | None = None
    task: asyncio.Task[None] | None = None
    clean_since: float | None = None
    no_repack: bool = False
    """Launched with --no-repack since it crashed while loading without."""


class Supervisor:
    """Runs every managed llama-server as a child and keeps it ready, or says why it cannot."""

    def __init__(
        self,
        config: Config,
        *,
        on_change: Callable[[ChildStatus], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._on_change = on_change
        self._clock = clock
        self._changed = asyncio.Event()
        self._children = {
            name: self._new_child(name) for name in SERVER_NAMES if config.server(name).managed
        }
        # Before any router reads it: the daemon's own key, when a child is locked with it.
        make_key(config)

    def _budget(self) -> RestartBudget:
        h = self._config.health
        return RestartBudget(
            h.max_restart_attempts,
            h.restart_window_seconds,
            h.backoff_initial_seconds,
            h.backoff_max_seconds,
            h.stable_after_seconds,
        )

    def _new_child(self, name: ServerName) -> _Child:
        return _Child(
            name=name,
            log=get_logger(server=name),
            budget=self._budget(),
            status=ChildStatus(name, ChildState.STOPPED, None, 0, None, time.time(), ""),
        )

    async def start(self) -> None:
        """Launch every managed server; returns at once, supervision runs as tasks."""
        for child in self._children.values():
            child.task = asyncio.create_task(self._supervise(child), name=f"supervise-{child.name}")

    async def stop(self) -> None:
        """SIGTERM each child's process group, SIGKILL after stop_timeout_seconds; reap all."""
        await asyncio.gather(*(self._stop_child(c) for c in self._children.values()))

    async def _stop_child(self, child: _Child) -> None:
        if child.task is not None:
            child.task.cancel()
            await asyncio.gather(child.task, return_exceptions=True)
        await self._terminate(child)

    async def reconfigure(self, config: Config, names: Iterable[ServerName]) -> None:
        """Adopt `config`; stop the named servers and start them again with their new settings.

        The others keep running (their settings did not change) under the new `health` section.
        """
        names = list(names)
        for name in names:
            child = self._children.pop(name, None)
            if child is not None:
                await self._stop_child(child)
        health_changed = config.health != self._config.health
        self._config = config
        if health_changed:  # probes read the config live; the restart budgets are rebuilt
            for child in self._children.values():
                child.budget = self._budget()
        for name in names:
            if config.server(name).managed:
                child = self._children[name] = self._new_child(name)
                child.task = asyncio.create_task(self._supervise(child), name=f"supervise-{name}")

    def is_ready(self, name: ServerName) -> bool:
        """Whether the router may send to `name`; an unmanaged server is the router's to check."""
        if name not in SERVER_NAMES:
            raise KeyError(name)
        child = self._children.get(name)
        return child is None or child.status.state is ChildState.READY

    def status(self) -> dict[ServerName, ChildStatus]:
        """The state of every managed child."""
        return {name: child.status for name, child in self._children.items()}

    async def wait_ready(self, timeout: float) -> bool:
        """True once every managed child is READY; False at `timeout` or when one has FAILED."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            states = [c.status.state for c in self._children.values()]
            if all(s is ChildState.READY for s in states):
                return True
            remaining = deadline - asyncio.get_running_loop().time()
            if ChildState.FAILED in states or remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _set(self, child: _Child, state: ChildState, message: str, **changes: Any) -> None:
        child.status = replace(
            child.status, state=state, message=message, since=time.time(), **changes
        )
        # Wake every waiter, then give later ones a fresh event to wait on.
        self._changed.set()
        self._changed = asyncio.Event()
        if self._on_change is not None:
            try:
                self._on_change(child.status)
            except Exception:
                child.log.exception("supervisor.on_change_failed")

    async def _supervise(self, child: _Child) -> None:
        d = self._config.daemon
        try:
            child.output = ChildLog(
                d.logs_dir / f"{child.name}.log", d.child_log_max_bytes, d.child_log_backups,
                child.log,
            )  # fmt: skip
        except OSError as exc:
            self._fail(child, f"cannot open log file in {d.logs_dir}: {exc.strerror}")
            return
        try:
            await self._restart_loop(child)
        except Exception as exc:
            # A bug of ours must not leave a child unwatched: end it and say so.
            child.log.exception("supervisor.crashed")
            if child.proc is not None:
                signal_group(child.proc, signal.SIGKILL)
            self._fail(child, f"supervisor error: {exc!r}")

    async def _restart_loop(self, child: _Child) -> None:
        while True:
            ran = False
            try:
                make_key(self._config)  # again: a child must never start unlocked
                launch = plan_launch(self._config, child.name)
                if child.no_repack:
                    launch = replace(launch, argv=(*launch.argv, NO_REPACK))
                placement = await self._placement(launch, self._config.server(child.name))
                ended = await self._run_once(child, launch, placement)
                ran, reason = True, ended.reason()
                if ended.crash is not None:
                    if self._retry_without_repack(child, ended, launch):
                        continue
                    return
            except PreflightFailed as exc:
                if not exc.transient:
                    self._fail(child, exc.message)
                    return
                reason = exc.message
            except WrongPlacement as exc:
                # Not restarted: the GPU will not appear by itself, and a model on the CPU
                # answers 10-50x slower while everything looks healthy.
                child.status = replace(child.status, placement="CPU")
                self._fail(child, f"on CPU — {exc.reason}", event="server.wrong_placement",
                           hint="set allow_cpu: true for this server to run it on the CPU on"
                           " purpose")  # fmt: skip
                return
            delay = None
            if self._config.health.restart_on_failure:
                delay = child.budget.next_delay(self._clock(), child.clean_since)
            child.clean_since = None
            if delay is None:
                self._fail(child, reason, tail=ran)
                return
            self._set(child, ChildState.BACKOFF, f"{reason}; restarting in {delay:.2f}s")
            child.log.warning(
                "server.restarting", reason=reason, delay_s=round(delay, 3),
                restarts=child.status.restarts + 1,
            )  # fmt: skip
            await asyncio.sleep(delay)
            child.status = replace(child.status, restarts=child.status.restarts + 1)

    def _retry_without_repack(self, child: _Child, ended: _Ended, launch: ServerLaunch) -> bool:
        """A crash of the binary while loading is no passing fault: no backoff loop. True: it
        is started once more at once with --no-repack (the AMX path of a GCC < 13 build faults
        there, docs/cpu.md); False: it is FAILED with the reason."""
        assert ended.crash is not None
        crash = "a crash of llama-server itself, not restarted"
        if {NO_REPACK, "-nr"} & set(launch.argv):
            self._fail(child, ended.reason(f", also with {NO_REPACK}: {crash}"), tail=True)
            return False
        if not self._config.server(child.name).retry_without_repack:
            self._fail(child, ended.reason(f": {crash} (retry_without_repack is off)"), tail=True)
            return False
        child.no_repack = True
        reason = ended.reason(f"; starting it once more with {NO_REPACK}")
        self._set(child, ChildState.BACKOFF, reason, restarts=child.status.restarts + 1)
        child.log.warning(
            "server.safe_mode", signal=ended.crash.name, reason=reason, added=NO_REPACK,
            why="a crash while loading; llama.cpp's AMX code from GCC < 13 faults there"
            " (llama.cpp #20824), and without repacking it is not used",
        )  # fmt: skip
        return True

    async def _placement(self, launch: ServerLaunch, server: ServerConfig) -> str | None:
        """Where the child will run, from `llama-server --list-devices` in the child's own
        environment (see gpu.py for why that source); WrongPlacement if that is the CPU while
        it was given a GPU and allow_cpu is off."""
        if server.n_gpu_layers == 0:
            return "CPU"
        binary = launch.argv[0]
        listing = await asyncio.to_thread(gpu.list_devices, binary, launch.env)
        if listing.devices is None:
            return None  # a build without --list-devices: its load log tells (_wrong_placement)
        if listing.devices:
            if server.gpu_id is not None:
                return f"GPU{server.gpu_id}"
            return "+".join(d.name for d in listing.devices)
        if server.wants_gpu and not server.allow_cpu:
            assert server.gpu_id is not None
            everything = await asyncio.to_thread(
                gpu.list_devices, binary, gpu.without_gpu_pin(launch.env)
            )
            raise WrongPlacement(gpu.no_gpu_reason(server.gpu_id, listing, everything))
        return "CPU"

    async def _run_once(self, child: _Child, launch: ServerLaunch, placement: str | None) -> _Ended:
        """One run of the child, from launch to exit; returns how it ended."""
        assert child.output is not None
        server = self._config.server(child.name)
        child.output.launching(launch.argv)
        proc = await spawn(launch.argv, launch.env)
        assert proc.stdout is not None
        child.proc = proc
        child.pump = asyncio.create_task(child.output.pump(proc.stdout))
        self._set(
            child, ChildState.STARTING, "loading model", pid=proc.pid, placement=placement,
            vram_mib=None,
        )  # fmt: skip
        child.log.info(
            "server.starting", pid=proc.pid, port=server.port, gpu_id=server.gpu_id,
            argv=list(launch.argv), log_file=str(child.output.path),
        )  # fmt: skip
        h = self._config.health
        client = LlamaClient(
            launch.base_url, timeout=h.probe_timeout_seconds, api_key=launch.api_key
        )
        exited = asyncio.create_task(proc.wait())
        wrong = None
        was_ready = False
        try:
            reason = "exited while loading the model"
            loading = self._until_ready(client, server.startup_timeout_seconds)
            if not await self._race(exited, loading):
                if not exited.done():
                    reason = f"not ready within {server.startup_timeout_seconds:g}s"
            elif wrong := self._wrong_placement(child, server):
                reason = "landed on the CPU"
            else:
                await self._sample_vram(child)
                was_ready = True
                child.clean_since = self._clock()
                self._set(child, ChildState.READY, "")
                child.log.info(
                    "server.ready", pid=proc.pid, port=server.port,
                    placement=child.status.placement, vram_mib=child.status.vram_mib,
                )  # fmt: skip
                reason = await self._race(exited, self._watch(child, client)) or "exited"
            by_itself = exited.done()
            if not by_itself:
                signal_group(proc, signal.SIGKILL)
            returncode = await exited
            await child.pump
        finally:
            exited.cancel()
            await client.aclose()
        child.proc = None
        how = exit_text(returncode)
        child.log.warning(
            "server.exited", pid=proc.pid, returncode=returncode, exit=how, reason=reason
        )
        self._set(child, child.status.state, f"{reason} ({how})", pid=None, last_exit=returncode)
        if wrong:
            raise WrongPlacement(wrong)
        said = child.output.tail()[-1:] if by_itself else []
        crashed = not was_ready and -returncode in CRASH_SIGNALS
        return _Ended(
            f"{reason} ({how})", said[0] if said else None,
            signal.Signals(-returncode) if crashed else None,
        )  # fmt: skip

    def _wrong_placement(self, child: _Child, server: ServerConfig) -> str | None:
        """Why the ready child must not serve, or None. Its own word overrides the device list:
        `no usable GPU found` in its output means its layers stayed on the CPU (and is all a
        build without --list-devices tells)."""
        assert child.output is not None
        if not child.output.no_gpu or server.n_gpu_layers == 0:
            return None
        child.status = replace(child.status, placement="CPU")
        if server.wants_gpu and not server.allow_cpu:
            return f"GPU {server.gpu_id} not used (llama-server: no usable GPU found)"
        return None

    async def _sample_vram(self, child: _Child) -> None:
        """The child's GPU memory now, where it may hold some; off the loop (nvidia-smi is a
        subprocess, NVML a blocking call)."""
        if child.status.placement == "CPU" or child.status.pid is None:
            return
        try:
            # Bounded: a driver in trouble must not stall the health checks that follow.
            async with asyncio.timeout(self._config.health.probe_timeout_seconds):
                used = await asyncio.to_thread(gpu.gpu_memory_by_pid)
        except TimeoutError:
            used = None
        # Not listed: nothing on the GPU, or a PID namespace the driver does not see into
        # (a container); either way no number beats a wrong 0.
        vram = None if used is None else used.get(child.status.pid)
        child.status = replace(child.status, vram_mib=vram)

    @staticmethod
    async def _race(exited: asyncio.Task[int], work: Awaitable[T]) -> T | None:
        """`work`'s result, or None as soon as the process exits first."""
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait({exited, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return None if exited.done() else task.result()

    async def _until_ready(self, client: LlamaClient, timeout: float) -> bool:
        # 503 "Loading model" and refused connections are both progress while a model loads.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if await self._probe(client, generate=False) is None:
                return True
            await asyncio.sleep(self._config.health.ready_poll_interval_seconds)
        return False

    async def _watch(self, child: _Child, client: LlamaClient) -> str:
        """Probe until the child counts as hung; returns why."""
        h = self._config.health
        loop = asyncio.get_running_loop()
        next_generation = loop.time() + h.generation_probe_interval_seconds
        failures = 0
        while True:
            await asyncio.sleep(h.check_interval_seconds)
            # /health can answer while generation is wedged, so once anything failed every
            # probe generates, or a good /health would hide the wedge.
            generate = failures > 0 or loop.time() >= next_generation
            problem = await self._probe(client, generate)
            await self._sample_vram(child)
            if generate:
                next_generation = loop.time() + h.generation_probe_interval_seconds
            if problem is None:
                if failures:
                    failures = 0
                    child.clean_since = self._clock()
                    self._set(child, ChildState.READY, "recovered")
                    child.log.info("server.ready", pid=child.status.pid, recovered=True)
                continue
            failures += 1
            child.clean_since = None
            self._set(child, ChildState.UNHEALTHY, problem)
            child.log.warning("server.unhealthy", problem=problem, failures=failures)
            if failures >= h.failures_before_hung:
                return f"hung: {problem} ({failures} failed probes in a row)"

    async def _probe(self, client: LlamaClient, generate: bool) -> str | None:
        """None if the server answers /health (and a 1-token generation), else what went wrong."""
        deadline = self._config.health.probe_timeout_seconds
        what = "/health"
        try:
            async with asyncio.timeout(deadline):
                health = await client.health()
            if health is not Health.READY:
                return f"/health: {health}"
            if generate:
                what = "/completion"
                async with asyncio.timeout(deadline):
                    await client.complete(_PROBE_PROMPT, n_predict=1, temperature=0.0)
        except TimeoutError:
            return f"{what}: no answer within {deadline:g}s"
        except LLMError as exc:
            return f"{what}: {exc}"
        return None

    def _fail(
        self,
        child: _Child,
        reason: str,
        event: str = "server.failed",
        *,
        tail: bool = False,
        **facts: Any,
    ) -> None:
        """FAILED for `reason`; `tail`: its last run's last lines are part of why."""
        last = tuple(child.output.tail()[-STATUS_TAIL:]) if tail and child.output else ()
        self._set(child, ChildState.FAILED, reason, pid=None, vram_mib=None, tail=last)
        child.log.error(
            event, reason=reason, last_exit=child.status.last_exit,
            restarts=child.status.restarts,
            log_tail=child.output.tail() if child.output else [], **facts,
        )  # fmt: skip

    async def _terminate(self, child: _Child) -> None:
        proc = child.proc
        if proc is not None:
            signal_group(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self._config.health.stop_timeout_seconds)
            except TimeoutError:
                child.log.warning("server.kill", pid=proc.pid, reason="SIGTERM ignored")
                signal_group(proc, signal.SIGKILL)
                await proc.wait()
            child.proc = None
        if child.pump is not None:
            await child.pump
        if child.output is not None:
            child.output.close()
        if child.status.state is not ChildState.FAILED:
            last_exit = proc.returncode if proc else child.status.last_exit
            self._set(child, ChildState.STOPPED, "daemon stopping", pid=None, last_exit=last_exit)
        child.log.info("server.stopped", last_exit=child.status.last_exit)
