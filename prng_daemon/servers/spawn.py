"""Starting a child that cannot outlive the daemon, and signalling its process group (the
llama-servers' and, by `killpg`, a local agent's)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence

__all__ = ["CRASH_SIGNALS", "exit_text", "killpg", "signal_group", "spawn"]

CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGILL, signal.SIGBUS})
"""Signals a program gets from its own bad code (or code built for another CPU), not from us."""

# Runs in the child, then execs llama-server. PR_SET_PDEATHSIG (1) = SIGKILL (9) makes the kernel
# kill the child when the daemon dies, even by SIGKILL; it survives execve. A wrapper rather than
# preexec_fn because preexec_fn runs Python between fork and exec, which can deadlock while other
# threads (the watchdog observer, asyncio's waitpid threads) hold locks. The getppid check closes
# the race where the daemon dies before prctl ran.
_PDEATHSIG_EXEC = (
    "import ctypes,os,sys\n"
    "if ctypes.CDLL(None,use_errno=True).prctl(1,9,0,0,0)!=0:os._exit(71)\n"
    "if os.getppid()!=int(sys.argv[1]):os._exit(70)\n"
    "os.execv(sys.argv[2],sys.argv[2:])\n"
)


async def spawn(argv: Sequence[str], env: Mapping[str, str]) -> asyncio.subprocess.Process:
    """Start `argv` in its own session, stdout and stderr on one pipe, killed if we die.

    Call from the event-loop thread: PDEATHSIG fires when the *thread* that forked exits."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", "-c", _PDEATHSIG_EXEC, str(os.getpid()), *argv,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=dict(env), start_new_session=True,
    )  # fmt: skip


def signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    """Signal the process group of a child started by `spawn`."""
    # Only while not yet reaped: after that the pid (= its group id) may belong to someone else.
    if proc.returncode is None:
        killpg(proc.pid, sig)


def killpg(pgid: int, sig: signal.Signals) -> None:
    """Signal process group `pgid` (a child started in its own session); nothing if it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def exit_text(returncode: int) -> str:
    """How a child ended, in words: `killed by SIGSEGV`, `exit status 1`."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"
