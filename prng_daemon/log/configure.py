"""structlog, configured once: JSON lines, a console view on a terminal, journald priorities."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from ..document.names import printable
from .journal import JournalSender, field_name
from .sentences import sentence

__all__ = ["SYSLOG_PRIORITY", "configure_logging", "get_logger", "is_journal", "pick_format"]

LogFormat = Literal["json", "console", "journal"]

_sender: JournalSender | None = None
"""The native journal socket of the current configuration (closed when reconfigured)."""

# sd-daemon(3): a "<N>" prefix on a line written to the journal sets its priority.
SYSLOG_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def is_journal(stream: TextIO, journal_stream: str | None) -> bool:
    """True when `stream` is the journal socket systemd named in $JOURNAL_STREAM (dev:inode)."""
    if not journal_stream:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return journal_stream == f"{info.st_dev}:{info.st_ino}"


def pick_format(stream: TextIO, journal_stream: str | None) -> LogFormat:
    if is_journal(stream, journal_stream):
        return "journal"
    return "console" if stream.isatty() else "json"


class _PriorityPrefix:
    """Render as JSON, prefixed with the syslog priority journald reads.

    With a native journal sender, the entry goes to journald instead: MESSAGE a sentence a person
    reads (sentences.py), every field as a field of its own (RUN_ID=, FILE=, EVENT=, ...); the
    prefixed stderr line is only the fallback when the socket does not take it.
    """

    def __init__(self, sender: JournalSender | None = None) -> None:
        self._json = structlog.processors.JSONRenderer(sort_keys=False)
        self._sender = sender

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        priority = SYSLOG_PRIORITY.get(str(event_dict.get("level", "info")), 6)
        if self._sender is not None:
            fields = {
                field_name(k): str(v)
                for k, v in event_dict.items()
                if k not in ("level", "timestamp") and v is not None
            }
            fields.update(
                MESSAGE=sentence(event_dict),
                PRIORITY=str(priority),
                SYSLOG_IDENTIFIER="prng-llm-daemon",
                EVENT=str(event_dict.get("event", "")),
            )
            if self._sender.send(fields):
                raise structlog.DropEvent
        rendered = self._json(logger, name, event_dict)
        text = rendered.decode() if isinstance(rendered, bytes) else rendered
        return f"<{priority}>{text}"


def _printable_values(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    """Escape control characters in every string value (a traceback keeps its line breaks)."""
    return {
        key: printable(value, newlines=key == "exception") if isinstance(value, str) else value
        for key, value in event_dict.items()
    }


def configure_logging(
    fmt: LogFormat = "json",
    level: str = "info",
    stream: TextIO | None = None,
    journal_socket: Path | None = None,
) -> None:
    """Set up structlog for the whole process; call once, early, from the CLI.

    `journal_socket`: with fmt "journal", send entries with native fields to this socket.
    """
    global _sender
    if _sender is not None:
        _sender.close()
    _sender = JournalSender(journal_socket) if fmt == "journal" and journal_socket else None
    renderer: Processor
    escape: list[Processor] = []
    if fmt == "console":
        # JSON escapes on its own; on a terminal a file name must not move the cursor or recolour.
        escape = [_printable_values]
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    elif fmt == "journal":
        renderer = _PriorityPrefix(_sender)
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *escape,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> FilteringBoundLogger:
    """A logger with `context` on every line it writes (lazy: safe to call at import time)."""
    logger: FilteringBoundLogger = structlog.get_logger(**context)
    return logger
