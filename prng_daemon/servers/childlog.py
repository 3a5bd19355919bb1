"""A child's output: copied to its own size-bounded, rotated file; notable lines to the log."""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .gpu import NO_GPU_LINE

__all__ = ["ChildLog", "RotatingFile", "classify"]

_CHUNK = 64 * 1024
_MAX_LINE = 4096
# llama.cpp prefixes lines with a timestamp and a level letter: "0.00.002.443 E srv ...".
_LEVEL = re.compile(rb"^(?:[\d.]+ )?([EW]) ")
_ERROR = re.compile(
    rb"out of memory|\bOOM\b|cudaMalloc failed|\berror\b|\bfailed\b|abort|terminate called"
    rb"|segmentation fault",
    re.IGNORECASE,
)
_WARNING = re.compile(rb"\bwarning\b", re.IGNORECASE)
_NOTABLE = re.compile(rb"model loaded|listening on", re.IGNORECASE)


def classify(line: bytes) -> str | None:
    """The log level a line of llama-server output deserves, or None to keep it in the file only."""
    level = _LEVEL.match(line)
    if (level and level.group(1) == b"E") or _ERROR.search(line):
        return "error"
    if (level and level.group(1) == b"W") or _WARNING.search(line):
        return "warning"
    if _NOTABLE.search(line):
        return "info"
    return None


class RotatingFile:
    """Append-only file that rolls over to NAME.1 .. NAME.<backups> past `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self._max = max_bytes
        self._backups = backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = path.open("ab")
        self._size = self._file.tell()

    def write(self, data: bytes) -> None:
        if self._size and self._size + len(data) > self._max:
            self._rotate()
        self._file.write(data)
        self._file.flush()
        self._size += len(data)

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self._backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self._backups:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = self.path.open("wb")
        self._size = 0

    def close(self) -> None:
        self._file.close()


class ChildLog:
    """One child's output across its restarts: the file, the recent lines, the notable ones."""

    def __init__(self, path: Path, max_bytes: int, backups: int, log: Any, tail_lines: int = 20):
        self._file = RotatingFile(path, max_bytes, backups)
        self._log = log
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self.no_gpu = False
        """Set when the child said its --n-gpu-layers will be ignored (gpu.NO_GPU_LINE); cleared
        at each launch."""

    @property
    def path(self) -> Path:
        return self._file.path

    def tail(self) -> list[str]:
        """The last lines the child wrote since its launch (for `server.failed`)."""
        return list(self._tail)

    def launching(self, argv: Sequence[str]) -> None:
        """A new run begins: marked in the file; what the last run said is forgotten."""
        self._file.write(f"--- prng-llm-daemon: launching {' '.join(argv)}\n".encode())
        self._tail.clear()
        self.no_gpu = False

    async def pump(self, stream: asyncio.StreamReader) -> None:
        """Copy `stream` to the file until EOF; chunks, not lines, so a huge line cannot stall."""
        partial = b""
        while chunk := await stream.read(_CHUNK):
            self._file.write(chunk)
            *lines, partial = (partial + chunk).split(b"\n")
            partial = partial[-_MAX_LINE:]
            for line in lines:
                self._line(line)
        if partial:
            self._line(partial)

    def _line(self, raw: bytes) -> None:
        raw = raw.rstrip(b"\r")[:_MAX_LINE]
        if not raw:
            return
        text = raw.decode("utf-8", "replace")
        self._tail.append(text)
        if NO_GPU_LINE.search(raw):
            self.no_gpu = True
        level = classify(raw)
        if level is not None:
            getattr(self._log, level)("server.output", line=text)

    def close(self) -> None:
        self._file.close()
