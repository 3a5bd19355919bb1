"""The key that locks the llama-server children: which file holds it, who makes it, one reader.

A managed server without an `api_key_file` of its own gets the daemon's key, STATE_DIR/llm.key,
made once (mode 0640: the service user and its group, so agents using get_router() can read it)
and kept across restarts, so running agents keep working. The same path is derived from the
config by the daemon, its children (`--api-key-file`) and every router, agents' included.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ..config import Config
from ..document.pipeline import SERVER_NAMES, ServerName

__all__ = [
    "KEY_FILE_NAME", "KEY_MODE", "KeyFileError", "key_file", "make_key", "own_key_file", "read_key",
]  # fmt: skip

KEY_FILE_NAME = "llm.key"
KEY_MODE = 0o640


class KeyFileError(Exception):
    """A key file that cannot be used; the message is `PATH: why`."""


def own_key_file(config: Config) -> Path:
    """The daemon's own key file."""
    return config.daemon.state_dir / KEY_FILE_NAME


def _uses_own_key(config: Config, name: ServerName) -> bool:
    server = config.server(name)
    return server.managed and server.api_key_file is None


def _child_at_same_address(config: Config, name: ServerName) -> ServerName | None:
    """The managed server that unmanaged server `name` points at, if any: one llama-server
    serving both roles (the demo, a one-model CPU box) is that child, and wants its key."""
    server = config.server(name)
    if server.managed:
        return None
    for other in SERVER_NAMES:
        peer = config.server(other)
        if other != name and peer.managed and (peer.host, peer.port) == (server.host, server.port):
            return other
    return None


def key_file(config: Config, name: ServerName) -> Path | None:
    """The key file of server `name`: its `api_key_file`, else the daemon's own key for a
    managed server (or an unmanaged role pointed at one). None for an unmanaged one without a
    key (someone else runs it open), and while the daemon's own key is not made yet: no daemon
    has run, so no child of it listens (the supervisor makes it before any launch;
    check-config and agents never do)."""
    server = config.server(name)
    if server.api_key_file is not None:
        return server.api_key_file
    child = _child_at_same_address(config, name)
    if child is not None:
        return key_file(config, child)
    own = own_key_file(config)
    return own if _uses_own_key(config, name) and own.exists() else None


def read_key(path: Path) -> str:
    """The key in `path`, read as llama-server's --api-key-file reads it: one key per line,
    blank lines and lines starting with '#' skipped; the first one is ours."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise KeyFileError(f"{path}: {reason}") from None
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise KeyFileError(f"{path}: holds no key")


def make_key(config: Config) -> None:
    """Make the daemon's own key file if a managed server uses it and it does not exist yet."""
    if not any(_uses_own_key(config, n) for n in SERVER_NAMES):
        return
    path = own_key_file(config)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside, then linked into place: a crash never leaves an empty key file behind, and
    # link() (unlike rename) never replaces a key another process made meanwhile.
    temp = path.with_name(f".{KEY_FILE_NAME}.{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, KEY_MODE)
    try:
        os.fchmod(fd, KEY_MODE)  # whatever the umask: group-readable, never world-readable
        os.write(fd, f"{secrets.token_urlsafe(32)}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
    except FileExistsError:
        pass
    finally:
        temp.unlink()
