"""A llama-server that crashes while loading its model (a GCC < 13 build's AMX code on a
Sapphire Rapids: SIGSEGV after "AMX model buffer size") is started once more with --no-repack,
or FAILED at once with the signal and its last lines, where the operator looks."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from prng_daemon.cli import main
from prng_daemon.log.sentences import sentence
from prng_daemon.servers.supervisor import ChildState, ChildStatus

from .helpers import free_port, until, wait_until
from .test_supervisor import events, make_config, script, server_section, supervising
from .workspace import make_workspace, stop, wait_ready

AMX_LINE = "load_tensors:   AMX model buffer size =   950.71 MiB"

# What the GCC 12 build did on a Sapphire Rapids: the AMX buffer line, then a general
# protection fault. With --no-repack there is no AMX buffer: the real llama-server runs.
STAND_IN = """\
#!{python}
import os, resource, signal, sys
if {always} or "--no-repack" not in sys.argv:
    print({line!r}, flush=True)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.kill(os.getpid(), signal.SIGSEGV)
os.execv({real!r}, [{real!r}, *sys.argv[1:]])
"""


def stand_in(tmp_path: Path, real: Path, *, always: bool) -> Path:
    """A llama-server that dies by SIGSEGV while loading (`always`: even with --no-repack)."""
    text = STAND_IN.format(python=sys.executable, always=always, line=AMX_LINE, real=str(real))
    return script(tmp_path, "llama-server", text)


def crash_config(binary: Path, tiny_model: Path, tmp_path: Path, **orchestrator: Any) -> Any:
    return make_config(
        binary, tiny_model.parent, tmp_path / "logs",
        server_section(tiny_model.name, **orchestrator),
        server_section(tiny_model.name, managed=False),
    )  # fmt: skip


def supervise_stand_in(
    tmp_path: Path, real: Path, tiny_model: Path, *, always: bool, until_state: ChildState
) -> tuple[ChildStatus, list[str], list[dict[str, Any]]]:
    """Supervise the stand-in as the orchestrator until it is in `until_state`: its status,
    its command line, the log events."""
    config = crash_config(stand_in(tmp_path, real, always=always), tiny_model, tmp_path)

    async def body() -> tuple[ChildStatus, list[str], list[dict[str, Any]]]:
        with capture_logs() as logs:
            async with supervising(config) as sup:
                status = await until(
                    lambda: (s := sup.status()["orchestrator"]).state is until_state and s,
                    60, f"the orchestrator {until_state}",
                )  # fmt: skip
                cmdline = Path(f"/proc/{status.pid}/cmdline") if status.pid else None
                argv = cmdline.read_bytes().decode().split("\0") if cmdline else []
                return status, argv, logs

    return asyncio.run(body())


def test_crash_while_loading_is_retried_once_without_repacking_and_serves(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    status, argv, logs = supervise_stand_in(
        tmp_path, llama_server_bin, tiny_model, always=False, until_state=ChildState.READY
    )
    assert status.restarts == 1 and status.last_exit == -signal.SIGSEGV
    assert "--no-repack" in argv
    (safe,) = events(logs, "server.safe_mode")
    assert safe["log_level"] == "warning" and safe["signal"] == "SIGSEGV"
    assert safe["added"] == "--no-repack"
    assert sentence(safe) == (
        "llama-server orchestrator exited while loading the model (killed by SIGSEGV);"
        f' starting it once more with --no-repack; its last line: "{AMX_LINE}"'
    )
    assert not events(logs, "server.restarting"), "no backoff: a crash is not passing"
    exited = events(logs, "server.exited")[0]
    assert sentence(exited) == (
        f"llama-server orchestrator (pid {exited['pid']}) exited while loading the model"
        " (killed by SIGSEGV)"
    )
    starts = events(logs, "server.starting")
    assert ["--no-repack" in e["argv"] for e in starts] == [False, True]


def test_a_binary_that_crashes_even_without_repacking_fails_after_that_one_retry(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """Five restarts are in the budget; a deterministic segfault uses none of them."""
    status, _, logs = supervise_stand_in(
        tmp_path, llama_server_bin, tiny_model, always=True, until_state=ChildState.FAILED
    )
    assert status.restarts == 1 and status.pid is None and status.last_exit == -signal.SIGSEGV
    assert status.message == (
        "exited while loading the model (killed by SIGSEGV), also with --no-repack: a crash"
        f' of llama-server itself, not restarted; its last line: "{AMX_LINE}"'
    )
    assert status.tail == (AMX_LINE,)
    assert len(events(logs, "server.starting")) == 2 and not events(logs, "server.restarting")
    (failed,) = events(logs, "server.failed")
    assert failed["log_level"] == "error" and AMX_LINE in failed["log_tail"]


def test_with_the_retry_off_a_crash_while_loading_fails_at_once_and_status_says_why(
    llama_server_bin: Path,
    tiny_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The daemon as a process: `status` and the STATUS= line (the status file's `status`)
    carry the signal and the child's last line; the journal sentence the reason."""
    binary = stand_in(tmp_path, llama_server_bin, always=False)
    orchestrator = {
        **server_section(tiny_model.name, port=free_port()), "retry_without_repack": False,
    }  # fmt: skip
    ws = make_workspace(
        tmp_path / "ws", 1, orchestrator={**orchestrator, "managed": True},
        daemon={"llama_server": str(binary), "models_dir": str(tiny_model.parent)},
    )  # fmt: skip
    proc = ws.start()
    try:
        wait_ready(ws)

        def status() -> tuple[int, str]:
            code = main(["status", "--config", str(ws.config_path)])
            return code, capsys.readouterr().out

        code, text = wait_until(lambda: (s := status()) and "orchestrator: failed" in s[1] and s,
                                30, what="the orchestrator failed in status")  # fmt: skip
        published = json.loads((ws.root / "state" / "status.json").read_text())
    finally:
        assert stop(proc) == 0
    with capsys.disabled():
        print("\n" + text)
    reason = (
        "exited while loading the model (killed by SIGSEGV): a crash of llama-server itself, not"
        f' restarted (retry_without_repack is off); its last line: "{AMX_LINE}"'
    )
    lines = text.splitlines()
    assert code == 0 and f"orchestrator failed: {reason}" in published["status"]
    assert f"orchestrator failed: {reason}" in lines[0]
    assert lines[1] == (
        f"  orchestrator: failed (restarts 0, last exit: killed by SIGSEGV) — {reason}"
    )
    assert lines[2:4] == ["    its last lines:", f"    | {AMX_LINE}"]
    assert "pid None" not in text
    (failed,) = ws.events("server.failed")
    assert sentence(failed) == f"llama-server orchestrator failed: {reason}"
    assert len(ws.events("server.starting")) == 1 and not ws.events("server.safe_mode")
