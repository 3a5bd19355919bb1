"""Checks made before a llama-server child is launched, and the command line it is launched with."""

from __future__ import annotations

import errno
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from .config import SERVER_NAMES, Config
from .pipeline import PIPELINE

__all__ = ["GGUF_MAGIC", "Launch", "PreflightFailed", "plan_launch"]

GGUF_MAGIC = b"GGUF"


class PreflightFailed(Exception):
    """A child cannot be launched. `transient` problems (a busy port) may clear on a retry;
    the others (binary, model, paths) need a person, so retrying them is a crash loop."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        self.message = message
        self.transient = transient
        super().__init__(message)


@dataclass(frozen=True)
class Launch:
    """What a checked child is started with."""

    argv: tuple[str, ...]
    env: dict[str, str]
    base_url: str
    api_key: str | None


def _binary(spec: str) -> str:
    found = shutil.which(spec) if os.sep not in spec else spec
    if found is None:
        raise PreflightFailed(f"llama-server binary not found on PATH: {spec}")
    path = Path(found)
    if not path.is_file():
        raise PreflightFailed(f"llama-server binary missing: {path}")
    if not os.access(path, os.X_OK):
        raise PreflightFailed(f"llama-server binary not executable: {path}")
    return str(path.resolve())


def _model(models_dir: Path, model: str) -> Path:
    root = models_dir.resolve()
    path = (root / model).resolve()
    if not path.is_relative_to(root):
        raise PreflightFailed(f"model path escapes the models dir {root}: {model}")
    try:
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except FileNotFoundError:
        raise PreflightFailed(f"model file missing: {path}") from None
    except IsADirectoryError:
        raise PreflightFailed(f"model path is a directory: {path}") from None
    except OSError as exc:
        raise PreflightFailed(f"model file unreadable: {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise PreflightFailed(f"model file is not GGUF (magic {magic!r}): {path}")
    return path


def _port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        # create_server sets SO_REUSEADDR like llama-server does, so a TIME_WAIT left by our
        # own previous child does not count as busy; a live listener does.
        socket.create_server((host, port), family=family).close()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PreflightFailed(
                f"port {port} on {host} already in use by another process", transient=True
            ) from None
        raise PreflightFailed(f"cannot bind {host}:{port}: {exc.strerror}") from None


def _api_key(path: Path) -> str:
    """The first key in a llama-server --api-key-file (one per line, '#' starts a comment)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PreflightFailed(f"api key file unreadable: {path}: {exc}") from None
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise PreflightFailed(f"api key file holds no key: {path}")


def _probe_url(host: str, port: int) -> str:
    # A wildcard bind is reachable on loopback; the probe never needs the outside address.
    probe = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{probe}]:{port}" if ":" in probe else f"http://{probe}:{port}"


def plan_launch(config: Config, name: str) -> Launch:
    """Check everything child `name` needs and return how to start it; raise PreflightFailed."""
    server = config.server(name)
    daemon = config.daemon
    binary = _binary(daemon.llama_server)
    model = _model(daemon.models_dir, server.model)
    api_key = _api_key(server.api_key_file) if server.api_key_file else None
    _port_free(server.host, server.port)
    argv = [
        binary,
        "--model", str(model),
        "--host", server.host,
        "--port", str(server.port),
        "--ctx-size", str(server.context_length),
        "--n-gpu-layers", str(server.n_gpu_layers),
        "--threads", str(server.threads),
        "--batch-size", str(server.batch_size),
        "--parallel", str(server.parallel),
    ]  # fmt: skip
    if server.api_key_file:
        argv += ["--api-key-file", str(server.api_key_file)]
    argv += server.extra_args
    env = dict(os.environ)
    if server.gpu_id is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(server.gpu_id)
    return Launch(tuple(argv), env, _probe_url(server.host, server.port), api_key)


def environment_problems(config: Config) -> list[str]:
    """What would stop the daemon from working on this machine, one line each, without starting
    anything: binaries and models of managed servers, agent programs and the pipeline's agents.
    A busy port is not listed (the running daemon may hold it)."""
    problems = []
    for name in SERVER_NAMES:
        if config.server(name).managed:
            try:
                plan_launch(config, name)
            except PreflightFailed as exc:
                if not exc.transient:
                    problems.append(f"{name}: {exc}")
    for name, agent in config.agents.items():
        if shutil.which(agent.argv[0]) is None:
            problems.append(f"agents.{name}.argv[0]: program not found: {agent.argv[0]}")
        if agent.cwd is not None and not agent.cwd.is_dir():
            problems.append(f"agents.{name}.cwd: not a directory: {agent.cwd}")
    for row in PIPELINE:
        if not row.is_last and row.follow_up_agent not in config.agents:
            problems.append(
                f"agents: no {row.follow_up_agent!r}: step {row.number} results would be"
                " quarantined (the follow-up agent is not configured)"
            )
    return problems
