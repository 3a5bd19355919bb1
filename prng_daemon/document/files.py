"""Atomic JSON writes for the files the daemon leaves beside the results (decision records, the
params files agents read, the status file), and their bounded names.

Nothing is written through a symbolic link: the results dir is writable by every agent, so
`decisions/` (or a record in it) replaced by a link must not make the daemon write elsewhere.
The directory is opened once without following a link and every step happens relative to it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from ..errors import UnsafePath

__all__ = ["SpareFiles", "record_name", "write_json_atomic"]

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


def write_json_atomic(
    path: Path, document: Any, *, durable: bool = True, spares: SpareFiles | None = None
) -> Path:
    """Write `document` to `path` so readers see the old file or the whole new one, never half.

    Raises UnsafePath when `path` or its directory is a symbolic link. `durable=False` skips the
    fsyncs (milliseconds on the launch path) for files that only matter while the process that
    reads them is alive, like an agent's params file; then `spares` (of `path`'s directory)
    gives the temporary file when one is left: a rename on the launch path, not a create.
    """
    data = (json.dumps(document, indent=2, sort_keys=False) + "\n").encode("utf-8")
    if spares is not None and not durable and spares.directory == path.parent:
        fd = spares.put(path.name, data, replace=True)
        if fd is not None:
            os.close(fd)
            return path
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


SPARE_PREFIX = ".spare-"


class SpareFiles:
    """Empty files made ahead in one directory, so that a file needed on the launch path is
    renamed into place there instead of created.

    Creating a file allocates an inode, and some filesystems make that slow at times: on a
    journal-less ext4, for ~35 s after files were deleted, each create scans past every
    recently deleted inode (0.13-0.36 ms on the development VM, where a rename costs 11 µs).
    An agent needs two new files before it can start (its params file, its log): with spares
    their inodes are allocated after the launch, off its path (RESULTS §1).

    A spare is a hidden `.spare-<random>` file, made with the mode a new file there gets. Only
    the file this process made is used: one that was replaced, linked elsewhere or written to
    since is dropped, and the caller creates its file as it would have. Spares left by an
    earlier process are removed when the first spares are made. Best effort throughout: a
    spare that cannot be made (a full disk) is simply not there; the create that replaces it
    says what is wrong.
    """

    def __init__(self, directory: Path, mode: int, *, refuse_link: bool = True, keep: int = 2):
        self.directory = directory
        self._mode = mode
        self._dir_flags = _DIR_FLAGS if refuse_link else _DIR_FLAGS & ~os.O_NOFOLLOW
        self._keep = keep
        self._spares: list[tuple[str, int]] = []  # (name, inode) of each spare made
        self._swept = False

    def refill(self) -> None:
        """Make spares until `keep` are there."""
        if len(self._spares) >= self._keep and self._swept:
            return
        try:  # not made if missing: that is the create's to do (and to report)
            dir_fd = os.open(self.directory, self._dir_flags)
        except OSError:
            return
        try:
            if not self._swept:
                self._swept = True
                for name in os.listdir(dir_fd):
                    if name.startswith(SPARE_PREFIX):
                        os.unlink(name, dir_fd=dir_fd)
            while len(self._spares) < self._keep:
                name = f"{SPARE_PREFIX}{secrets.token_hex(8)}"
                fd = os.open(name, _TMP_FLAGS, self._mode, dir_fd=dir_fd)
                self._spares.append((name, os.fstat(fd).st_ino))
                os.close(fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    def put(self, name: str, data: bytes = b"", *, replace: bool) -> int | None:
        """Write `data` into a spare, then give it `name`; its fd, open for appending (the
        caller closes it). None when no spare can be used: none is left, `name` exists and not
        `replace` (or is a symbolic link), or the spare is not the empty file made. `replace`:
        a file already at `name` is replaced atomically (readers see the old or the whole new).
        """
        if not self._spares:
            return None
        spare, inode = self._spares.pop()
        try:
            dir_fd = os.open(self.directory, self._dir_flags)
        except OSError:
            return None
        fd = -1
        try:
            fd = os.open(spare, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=dir_fd)  # fmt: skip
            info = os.fstat(fd)
            if (info.st_ino, info.st_nlink, info.st_size) != (inode, 1, 0):
                os.close(fd)  # not the file made: left alone, and no longer a spare
                return None
            if replace and _is_link(dir_fd, name):
                self._spares.append((spare, inode))  # unused: the caller's write refuses it
                os.close(fd)
                return None
            _write_all(fd, data)
            if replace:
                os.replace(spare, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            else:  # link, not rename: a file at `name` (made meanwhile or not) stays as it is
                try:
                    os.link(spare, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except FileExistsError:
                    self._spares.append((spare, inode))  # unused: still a spare
                    os.close(fd)
                    return None
                os.unlink(spare, dir_fd=dir_fd)
        except OSError:
            if fd >= 0:
                os.close(fd)
                with contextlib.suppress(OSError):  # half written, or named twice: not a spare
                    os.unlink(spare, dir_fd=dir_fd)
            return None
        finally:
            os.close(dir_fd)
        return fd

    def discard(self) -> None:
        """Remove the spares made (the directory is no longer used, or the daemon stops)."""
        spares, self._spares = self._spares, []
        for name, _ in spares:
            try:
                os.unlink(self.directory / name)
            except OSError:
                pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
