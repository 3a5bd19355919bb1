"""The daemon's exceptions: one shallow tree, converted to exit codes in the CLI."""

from __future__ import annotations

import errno

__all__ = [
    "PASSING_ERRNOS",
    "AgentFailed",
    "ConfigError",
    "DaemonError",
    "FetchError",
    "LLMBadAnswer",
    "LLMError",
    "LLMUnavailable",
    "LaunchUnavailable",
    "LedgerCorrupt",
    "ResultRejected",
    "UnsafePath",
]

PASSING_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.EIO, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN,
     errno.ENOSPC, errno.EDQUOT}
)  # fmt: skip
"""Errors that say nothing of the file or the agent at hand (no fd, memory, process or disk
space left now, a disk hiccup): they pass, so what met one is tried again soon, never
quarantined or failed. Only a result file's own content can reject it."""


class DaemonError(Exception):
    """Base of every error the daemon raises on purpose."""


class ConfigError(DaemonError):
    """The configuration cannot be used; `problems` holds one line per bad field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class FetchError(DaemonError):
    """A model could not be fetched, or what was fetched is not the pinned file."""


class ResultRejected(DaemonError):
    """A result file failed validation.

    `reason` and `pointer` (a JSON pointer, "" for the whole file) name the first problem;
    `problems` lists every one found as (pointer, message).
    """

    def __init__(
        self,
        reason: str,
        pointer: str = "",
        problems: list[tuple[str, str]] | None = None,
        *,
        maybe_partial: bool = False,
    ) -> None:
        self.reason = reason
        self.maybe_partial = maybe_partial
        """The bytes end early the way a file still being written does (bad JSON or UTF-8)."""
        self.pointer = pointer
        self.problems = problems or [(pointer, reason)]
        super().__init__(f"{pointer}: {reason}" if pointer else reason)


class LLMError(DaemonError):
    """Something went wrong talking to a llama-server."""


class LLMUnavailable(LLMError):
    """No server could answer: unreachable, still loading, timed out or failed."""


class LLMBadAnswer(LLMError):
    """A server answered, but not with what was asked for (HTTP error, malformed body)."""


class AgentFailed(DaemonError):
    """A follow-up agent could not be started or exited badly."""


class LaunchUnavailable(AgentFailed):
    """What starts agents cannot be used now (a Slurm controller down, sbatch missing, a job
    refused): the launch is escalated, to be approved once it is fixed."""


class UnsafePath(DaemonError):
    """A write was refused: the file or its directory is a symbolic link (or not a directory)."""


class LedgerCorrupt(DaemonError):
    """The ledger file is not an intact SQLite database; the CLI says what to do about it."""

    def __init__(self, path: object, detail: str) -> None:
        super().__init__(
            f"ledger {path} is corrupt (sqlite: {detail}): move it aside and restart;"
            " the daemon rebuilds it from the results dir"
        )
