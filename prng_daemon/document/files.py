"""Atomic JSON writes for the files the daemon leaves beside the results (decision records, the
params files agents read, the status file), and their bounded names.

Nothing is written through a symbolic link: the results dir is writable by every agent, so
`decisions/` (or a record in it) replaced by a link must not make the daemon write elsewhere.
The directory is opened once without following a link and every step happens relative to it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from ..errors import UnsafePath

__all__ = ["make_dir", "record_name", "write_json_atomic"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(directory: Path) -> int:
    """Open `directory` (created if missing); refuse it if it is a symbolic link.

    Only its last component is checked: the configured paths above it are the operator's.
    """
    try:
        try:
            return os.open(directory, _DIR_FLAGS)
        except FileNotFoundError:
            # Created only when missing: mkdir(exist_ok) on every write costs two more
            # system calls and an exception, on the launch path.
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                pass  # a dangling link or a file in its place: the open below says so
            return os.open(directory, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(
                f"{directory} is a symbolic link or not a directory; nothing is written through it"
            ) from None
        raise


def make_dir(directory: Path) -> bool:
    """Make `directory` again if it vanished (a clean-up removed it); True if it was made.

    Raises UnsafePath when a symbolic link (or a file) is in its place: nothing is made or
    written through it."""
    existed = os.path.lexists(directory)
    os.close(_open_dir(directory))
    return not existed


def write_json_atomic(path: Path, document: Any, *, durable: bool = True) -> Path:
    """Write `document` to `path` so readers see the old file or the whole new one, never half.

    Raises UnsafePath when `path` or its directory is a symbolic link. `durable=False` skips the
    fsyncs (milliseconds on the launch path) for files that only matter while the process that
    reads them is alive, like an agent's params file.
    """
    data = (json.dumps(document, indent=2, sort_keys=False) + "\n").encode("utf-8")
    dir_fd = _open_dir(path.parent)
    try:
        tmp = f".{path.name}.{secrets.token_hex(4)}.tmp"
        # 0o666 less the umask, like any new file (the unit's UMask=0027 makes it 0640).
        fd = os.open(tmp, _TMP_FLAGS, 0o666, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            _refuse_link(dir_fd, path)
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            os.unlink(tmp, dir_fd=dir_fd)
            raise
        if durable:  # the rename itself survives a power cut only once the directory is synced
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _refuse_link(dir_fd: int, path: Path) -> None:
    # rename() would replace a link rather than follow it, but a link where a record belongs was
    # put there by someone: say so instead of quietly removing it.
    if _is_link(dir_fd, path.name):
        raise UnsafePath(f"{path} is a symbolic link; nothing is written through it")


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


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
