"""The supervisor against the real llama-server: readiness, crash and hang restarts, budgets,
preflight failures, graceful stop and no orphans when the daemon is SIGKILLed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from prng_daemon.config import Config
from prng_daemon.servers.backoff import RestartBudget
from prng_daemon.servers.supervisor import ChildState, ChildStatus, Supervisor

from .helpers import free_port, pids_running, until, wait_until

FAST_HEALTH: dict[str, Any] = {
    "check_interval_seconds": 0.2,
    "generation_probe_interval_seconds": 0.4,
    "probe_timeout_seconds": 0.5,
    "failures_before_hung": 2,
    "backoff_initial_seconds": 0.05,
    "backoff_max_seconds": 0.5,
    "max_restart_attempts": 5,
    "restart_window_seconds": 60.0,
    "ready_poll_interval_seconds": 0.05,
    "stop_timeout_seconds": 5.0,
}


def server_section(model: str, **overrides: Any) -> dict[str, Any]:
    return {
        "model": model, "port": free_port(), "context_length": 256, "batch_size": 64,
        "threads": 1, "parallel": 1, "n_gpu_layers": 0, "startup_timeout_seconds": 30.0,
        **overrides,
    }  # fmt: skip


def make_config(
    binary: Path,
    models_dir: Path,
    logs_dir: Path,
    orchestrator: dict[str, Any],
    math: dict[str, Any],
    **health: Any,
) -> Config:
    return Config.model_validate(
        {
            "orchestrator": orchestrator,
            "math": math,
            "health": {**FAST_HEALTH, **health},
            "daemon": {
                "llama_server": str(binary),
                "models_dir": models_dir,
                "logs_dir": logs_dir,
                "state_dir": logs_dir,
            },  # the daemon's key file goes there
        }
    )


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def supervising(config: Config, **kwargs: Any) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(config, **kwargs)
    await supervisor.start()
    try:
        yield supervisor
    finally:
        await supervisor.stop()


def events(
    logs: list[dict[str, Any]], name: str, server: str | None = None
) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name and server in (None, e.get("server"))]


@pytest.fixture
def two_servers(llama_server_bin: Path, tiny_model: Path, tmp_path: Path) -> Config:
    return make_config(
        llama_server_bin, tiny_model.parent, tmp_path / "logs",
        server_section(tiny_model.name, gpu_id=0), server_section(tiny_model.name, gpu_id=1),
    )  # fmt: skip


def script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def ready_with_new_pid(sup: Supervisor, old: int) -> bool:
    return sup.is_ready("orchestrator") and sup.status()["orchestrator"].pid != old


def test_killed_child_is_replaced_and_other_untouched(two_servers: Config, tmp_path: Path) -> None:
    """kill -9 of the orchestrator: back to READY within seconds, math keeps its pid."""
    recovery: list[float] = []

    async def body() -> None:
        changes: list[ChildStatus] = []
        with capture_logs() as logs:
            async with supervising(two_servers, on_change=changes.append) as sup:
                assert await sup.wait_ready(30)
                math_pid = sup.status()["math"].pid
                env = Path(f"/proc/{math_pid}/environ").read_bytes().split(b"\0")
                assert b"CUDA_VISIBLE_DEVICES=1" in env
                for _ in range(3):
                    old = sup.status()["orchestrator"].pid
                    assert old is not None
                    os.kill(old, signal.SIGKILL)
                    killed = time.monotonic()
                    await until(partial(ready_with_new_pid, sup, old), 10, "a replacement")
                    recovery.append(time.monotonic() - killed)
                status = sup.status()
                assert status["orchestrator"].restarts == 3
                assert status["orchestrator"].last_exit == -signal.SIGKILL
                assert status["math"].pid == math_pid and status["math"].restarts == 0
            assert [c.state for c in changes if c.name == "math"][-2:] == ["ready", "stopped"]
        exits = events(logs, "server.exited", "orchestrator")
        assert [e["returncode"] for e in exits] == [-9, -9, -9]
        assert not events(logs, "server.exited", "math")
        assert any("model loaded" in e["line"] for e in events(logs, "server.output", "math"))
        assert sup.status()["math"].state is ChildState.STOPPED
        assert sup.status()["math"].last_exit == 0  # SIGTERM sufficed

    run(body)
    assert "model loaded" in (tmp_path / "logs" / "orchestrator.log").read_text()
    print(f"\nkill -9 -> ready again: {[round(t, 3) for t in recovery]} "
          f"median {statistics.median(recovery):.3f}s")  # fmt: skip


def test_stopped_child_counts_as_hung_and_is_restarted(two_servers: Config) -> None:
    """SIGSTOP: the process lives but answers nothing; liveness must notice and replace it."""

    async def body() -> None:
        with capture_logs() as logs:
            async with supervising(two_servers) as sup:
                assert await sup.wait_ready(30)
                old = sup.status()["orchestrator"].pid
                assert old is not None
                os.kill(old, signal.SIGSTOP)
                stopped = time.monotonic()
                try:
                    await until(lambda: sup.status()["orchestrator"].pid not in (old, None), 15,
                                "the hung child to be replaced")  # fmt: skip
                    detected = time.monotonic() - stopped
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(old, signal.SIGCONT)
                await until(lambda: sup.is_ready("orchestrator"), 10, "ready again")
        (exited,) = events(logs, "server.exited", "orchestrator")[:1]
        assert exited["returncode"] == -9 and exited["reason"].startswith("hung")
        assert len(events(logs, "server.unhealthy", "orchestrator")) >= 2
        print(f"\nSIGSTOP hang detected and replaced after {detected:.3f}s")

    run(body)


FAKE_SERVER = """\
#!{python}
# Answers /health 200 at once, but /completion never: generation wedged behind a healthy /health.
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b'{{"status":"ok"}}')
    def do_POST(self):
        time.sleep(3600)
    def log_message(self, *a):
        pass
port = int(sys.argv[sys.argv.index("--port") + 1])
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_wedged_generation_behind_healthy_health_is_restarted(
    tiny_model: Path, tmp_path: Path
) -> None:
    fake = script(tmp_path, "fake-server", FAKE_SERVER.format(python=sys.executable))
    config = make_config(
        fake, tiny_model.parent, tmp_path / "logs",
        server_section(tiny_model.name), server_section(tiny_model.name, managed=False),
    )  # fmt: skip

    async def body() -> None:
        with capture_logs() as logs:
            async with supervising(config) as sup:
                assert sup.is_ready("math")  # unmanaged: the router asks it itself
                await until(lambda: sup.status()["orchestrator"].restarts >= 1, 15, "a restart")
        problems = [e["problem"] for e in events(logs, "server.unhealthy")]
        assert problems and all(p.startswith("/completion") for p in problems)
        assert events(logs, "server.exited")[0]["reason"].startswith("hung: /completion")

    run(body)


def test_missing_model_fails_at_once_and_other_serves(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    config = make_config(
        llama_server_bin, tiny_model.parent, tmp_path / "logs",
        server_section("absent.gguf"), server_section(tiny_model.name),
    )  # fmt: skip

    async def body() -> None:
        with capture_logs() as logs:
            async with supervising(config) as sup:
                assert not await sup.wait_ready(30)  # returns early: one child FAILED
                await until(lambda: sup.is_ready("math"), 30, "math ready")
                orch = sup.status()["orchestrator"]
                assert orch.state is ChildState.FAILED and not sup.is_ready("orchestrator")
                assert orch.message == f"model file missing: {tiny_model.parent / 'absent.gguf'}"
                assert orch.restarts == 0
        assert not events(logs, "server.starting", "orchestrator")
        assert len(events(logs, "server.failed", "orchestrator")) == 1

    run(body)


def test_port_taken_by_someone_else_is_a_clear_error(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    config = make_config(
        llama_server_bin, tiny_model.parent, tmp_path / "logs",
        server_section(tiny_model.name), server_section(tiny_model.name),
        max_restart_attempts=1,
    )  # fmt: skip
    port = config.orchestrator.port

    async def body() -> None:
        with socket.create_server(("127.0.0.1", port)), capture_logs() as logs:
            async with supervising(config) as sup:
                await until(lambda: sup.status()["orchestrator"].state is ChildState.FAILED,
                            10, "orchestrator FAILED")  # fmt: skip
                await until(lambda: sup.is_ready("math"), 30, "math ready")
        (failed,) = events(logs, "server.failed", "orchestrator")
        assert failed["reason"] == f"port {port} on 127.0.0.1 already in use by another process"
        assert not events(logs, "server.starting", "orchestrator")

    run(body)


def test_child_exiting_at_once_backs_off_until_budget_spent(
    tiny_model: Path, tmp_path: Path
) -> None:
    crashing = script(tmp_path, "crash", "#!/bin/sh\necho 'error: cannot load model' >&2\nexit 1\n")
    config = make_config(
        crashing, tiny_model.parent, tmp_path / "logs",
        server_section(tiny_model.name), server_section(tiny_model.name, managed=False),
        max_restart_attempts=4, backoff_initial_seconds=0.05, backoff_max_seconds=0.3,
    )  # fmt: skip

    async def body() -> None:
        with capture_logs() as logs:
            async with supervising(config) as sup:
                assert not await sup.wait_ready(10)
                status = sup.status()["orchestrator"]
                assert status.state is ChildState.FAILED and status.restarts == 4
                assert status.last_exit == 1 and not sup.is_ready("orchestrator")
        delays = [e["delay_s"] for e in events(logs, "server.restarting")]
        assert delays == [0.05, 0.1, 0.2, 0.3]
        (failed,) = events(logs, "server.failed")
        assert failed["last_exit"] == 1 and failed["log_level"] == "error"
        assert "error: cannot load model" in failed["log_tail"]
        assert len(events(logs, "server.starting")) == 5

    run(body)


def test_child_ignoring_sigterm_is_killed_after_stop_timeout(
    tiny_model: Path, tmp_path: Path
) -> None:
    stubborn = script(tmp_path, "stubborn", "#!/bin/sh\ntrap '' TERM\nexec sleep 600\n")
    config = make_config(
        stubborn, tiny_model.parent, tmp_path / "logs",
        server_section(tiny_model.name), server_section(tiny_model.name, managed=False),
        stop_timeout_seconds=0.3,
    )  # fmt: skip

    async def body() -> None:
        sup = Supervisor(config)
        await sup.start()
        pid = await until(lambda: sup.status()["orchestrator"].pid, 5, "a pid")
        # Past the exec wrapper, so the trap is set before SIGTERM comes.
        await until(lambda: b"sleep" in Path(f"/proc/{pid}/cmdline").read_bytes(), 5, "exec")
        await sup.stop()
        assert sup.status()["orchestrator"].last_exit == -signal.SIGKILL

    run(body)


DAEMON = """
import asyncio, json, sys
from prng_daemon.config import parse_config
from prng_daemon.log import configure_logging
from prng_daemon.servers.supervisor import Supervisor
async def main():
    configure_logging("json", stream=sys.stderr)
    sup = Supervisor(parse_config(sys.argv[1]))
    await sup.start()
    assert await sup.wait_ready(30)
    print(json.dumps([s.pid for s in sup.status().values()]), flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def test_sigkilled_daemon_leaves_no_llama_server(two_servers: Config) -> None:
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON, two_servers.model_dump_json()],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert daemon.stdout is not None
        pids = set(json.loads(daemon.stdout.readline()))
        assert len(pids) == 2 and pids <= pids_running("llama-server")
    finally:
        daemon.kill()
        daemon.wait()
        daemon.stdout.close()  # type: ignore[union-attr]
    killed = time.monotonic()
    wait_until(lambda: not pids & pids_running("llama-server"), 5, what="children to die")
    print(f"\nllama-servers left after SIGKILL of the daemon: 0 "
          f"(gone within {time.monotonic() - killed:.3f}s)")  # fmt: skip


def test_budget_backoff_doubles_to_cap_and_ends() -> None:
    budget = RestartBudget(attempts=4, window=60, initial=1, cap=5, stable_after=600)
    assert [budget.next_delay(t, None) for t in (0, 1, 3, 7, 8)] == [1, 2, 4, 5, None]


def test_budget_window_forgets_old_restarts_but_keeps_backoff() -> None:
    budget = RestartBudget(attempts=2, window=10, initial=1, cap=100, stable_after=600)
    assert [budget.next_delay(t, None) for t in (0, 1, 2)] == [1, 2, None]
    assert budget.next_delay(10.5, None) == 4  # the restart at 0 left the window
    assert budget.next_delay(10.9, None) is None  # the ones at 1 and 10.5 still count


def test_budget_refills_after_a_stable_run() -> None:
    budget = RestartBudget(attempts=2, window=1000, initial=1, cap=100, stable_after=60)
    assert [budget.next_delay(t, None) for t in (0, 1, 2)] == [1, 2, None]
    assert budget.next_delay(100, clean_since=50) is None  # clean for 50 s: not yet stable
    assert budget.next_delay(200, clean_since=140) == 1  # clean for 60 s: all forgiven
