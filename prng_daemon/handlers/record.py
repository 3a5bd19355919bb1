"""Atomic writes of what the daemon decided: decision records and the params files agents read."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["record_name", "write_json_atomic"]


def write_json_atomic(path: Path, document: Any, *, durable: bool = True) -> Path:
    """Write `document` to `path` so readers see the old file or the whole new one, never half.

    `durable=False` skips the fsync (milliseconds on the launch path) for files that only
    matter while the process that reads them is alive, like an agent's params file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2, sort_keys=False)
            f.write("\n")
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


MAX_STEM_BYTES = 160
"""A file name may be 255 bytes; a record adds `.<hash8>.<kind>.json` (at most 24) and its temp
file `.` + `.XXXXXXXX.tmp` (14) to the result's stem, so longer stems are shortened."""


def record_name(result_path: Path, sha256: str, kind: str) -> str:
    """`step2_x.json` + hash -> `step2_x.1a2b3c4d.<kind>.json`: one per file version.

    A stem over MAX_STEM_BYTES keeps its head and gets a hash of the whole stem instead of the
    rest, so long names that share a head still get records of their own.
    """
    stem = result_path.stem
    raw = os.fsencode(stem)
    if len(raw) > MAX_STEM_BYTES:
        head = raw[: MAX_STEM_BYTES - 9].decode("utf-8", "ignore")  # never half a character
        stem = f"{head}~{hashlib.sha256(raw).hexdigest()[:8]}"
    return f"{stem}.{sha256[:8]}.{kind}.json"
