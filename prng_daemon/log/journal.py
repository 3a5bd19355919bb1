"""The journal's native protocol (systemd.journal-fields(7)): one datagram per entry, with fields.

With it, `journalctl -u prng-llm-daemon RUN_ID=step3_...` finds a file's whole story by field,
not by grep. Used only when stderr already is the journal ($JOURNAL_STREAM).
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Mapping
from pathlib import Path

__all__ = ["JOURNAL_SOCKET", "JournalSender", "encode_entry", "field_name"]

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")

_INVALID = re.compile(r"[^A-Z0-9_]")
# Fields the journal or journalctl give a meaning (systemd.journal-fields(7)): an event's own
# `message=` or `unit=` must not replace the sentence or pose as systemd's.
_RESERVED = frozenset(
    "MESSAGE MESSAGE_ID PRIORITY CODE_FILE CODE_LINE CODE_FUNC ERRNO INVOCATION_ID TID"
    " SYSLOG_FACILITY SYSLOG_IDENTIFIER SYSLOG_PID SYSLOG_TIMESTAMP SYSLOG_RAW DOCUMENTATION"
    " UNIT USER_UNIT USER_INVOCATION_ID".split()
)


def field_name(key: str) -> str:
    """`run_id` -> `RUN_ID`: upper case, letters, digits and `_`, not starting with `_`; a name
    the journal reserves gets a `PRNG_` prefix (`message` -> `PRNG_MESSAGE`)."""
    name = _INVALID.sub("_", key.upper()).lstrip("_")[:64] or "FIELD"
    return f"PRNG_{name}" if name in _RESERVED or name.startswith("OBJECT_") else name


def encode_entry(fields: Mapping[str, str]) -> bytes:
    """Serialise fields; a value with a newline uses the length-prefixed binary form."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalSender:
    """Sends entries to journald; `send` says False when it could not (the caller falls back)."""

    def __init__(self, path: Path = JOURNAL_SOCKET) -> None:
        self._path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    def send(self, fields: Mapping[str, str]) -> bool:
        try:
            self._sock.sendto(encode_entry(fields), self._path)
        except OSError:  # no journal, queue full, entry too large: the stderr line still works
            return False
        return True

    def close(self) -> None:
        self._sock.close()
