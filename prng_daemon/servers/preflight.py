"""Checks made before a llama-server child is launched, and the command line it is launched with."""

from __future__ import annotations

import errno
import os
import shutil
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..document.pipeline import PIPELINE, SERVER_NAMES, ServerName
from ..llm.apikey import KeyFileError, key_file, read_key
from . import gpu

__all__ = ["GGUF_MAGIC", "PreflightFailed", "ServerLaunch", "plan_launch"]

GGUF_MAGIC = b"GGUF"


class PreflightFailed(Exception):
    """A child cannot be launched. `transient` problems (a busy port) may clear on a retry;
    the others (binary, model, paths) need a person, so retrying them is a crash loop."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        self.message = message
        self.transient = transient
        super().__init__(message)


@dataclass(frozen=True)
class ServerLaunch:
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


def _api_key(config: Config, name: ServerName) -> tuple[Path | None, str | None]:
    """The key file server `name` is started with (apikey.key_file), and the key in it."""
    path = key_file(config, name)
    if path is None:
        return None, None
    try:
        return path, read_key(path)
    except KeyFileError as exc:
        raise PreflightFailed(f"api key file unreadable: {exc}") from None


def plan_launch(config: Config, name: ServerName) -> ServerLaunch:
    """Check everything child `name` needs and return how to start it; raise PreflightFailed."""
    server = config.server(name)
    daemon = config.daemon
    binary = _binary(daemon.llama_server)
    model = _model(daemon.models_dir, server.model)
    key_path, api_key = _api_key(config, name)
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
    if key_path is not None:
        argv += ["--api-key-file", str(key_path)]
    argv += server.extra_args
    env = dict(os.environ)
    url = server.url
    # CORS: only the server's own origin, so no web page opened on this box may call it (the
    # default is every origin). An environment variable, not --cors-origins: builds that predate
    # the flag ignore it, where an unknown flag would stop them. extra_args can still open it.
    env.setdefault("LLAMA_ARG_CORS_ORIGINS", url)
    if server.gpu_id is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(server.gpu_id)
    return ServerLaunch(tuple(argv), env, url, api_key)


GIB = 1 << 30


def gpu_problems(config: Config, launches: Mapping[ServerName, ServerLaunch]) -> list[str]:
    """For each launchable server given a GPU (gpu_id, n_gpu_layers > 0, allow_cpu off): that
    llama-server sees that GPU, and that the models pinned to one GPU fit its free memory (each
    model's file size, or its vram_estimate_gb when larger). One line per problem."""
    wanting = [n for n in launches if config.server(n).wants_gpu and not config.server(n).allow_cpu]
    if not wanting:
        return []
    problems = []
    binary = launches[wanting[0]].argv[0]
    everything = gpu.list_devices(binary, gpu.without_gpu_pin(launches[wanting[0]].env))
    if everything.devices is None:
        return [
            f"gpu: {binary} has no --list-devices (a build before November 2024): GPUs not"
            " checked; the daemon still fails a child whose log says it runs on the CPU"
        ]
    if everything.devices:
        pass  # the GPUs are there (whatever their driver): each pinned one is checked below
    elif (driver := gpu.nvidia_gpus()) is None:
        problems.append("gpu: no NVIDIA driver answers on this machine (no NVML, no nvidia-smi)")
    else:
        problems.append(
            f"gpu: {binary} lists no GPU while the NVIDIA driver reports {driver}: it was built"
            " without GPU support (see systemd/README.md, 1.)"
        )
    needs: dict[int, list[tuple[str, float]]] = {}
    listed: dict[int, gpu.Listing] = {}
    devices: dict[int, gpu.Device] = {}
    for name in wanting:
        server = config.server(name)
        assert server.gpu_id is not None
        launch = launches[name]
        if server.gpu_id not in listed:
            listed[server.gpu_id] = gpu.list_devices(binary, launch.env)
        pinned = listed[server.gpu_id]
        if not pinned.devices:
            reason = gpu.no_gpu_reason(server.gpu_id, pinned, everything)
            problems.append(f"{name}: would run on the CPU: {reason}; set {name}.allow_cpu"
                            " to run it there on purpose")  # fmt: skip
            continue
        devices[server.gpu_id] = pinned.devices[0]  # pinned: CUDA0 is GPU gpu_id
        size = Path(launch.argv[launch.argv.index("--model") + 1]).stat().st_size / GIB
        need = max(size, server.vram_estimate_gb or 0.0)
        needs.setdefault(server.gpu_id, []).append((name, need))
    for gpu_id, wants in needs.items():
        total = sum(need for _, need in wants)
        device = devices[gpu_id]
        if total > device.free_mib / 1024:
            who = " + ".join(f"{name} {need:.1f} GiB" for name, need in wants)
            problems.append(
                f"gpu {gpu_id}: the models need about {total:.1f} GiB ({who}; file size or"
                f" vram_estimate_gb), {device.description} has {device.free_mib / 1024:.1f} GiB"
                " free"
            )
    return problems


def environment_problems(config: Config) -> list[str]:
    """What would stop the daemon from working on this machine, one line each, without starting
    anything: binaries and models of managed servers, their GPUs, agent programs and the
    pipeline's agents. A busy port is not listed (the running daemon may hold it)."""
    problems = []
    launches = {}
    for name in SERVER_NAMES:
        if config.server(name).managed:
            try:
                launches[name] = plan_launch(config, name)
            except PreflightFailed as exc:
                if not exc.transient:
                    problems.append(f"{name}: {exc}")
    problems += gpu_problems(config, launches)
    for agent_name, agent in config.agents.items():
        if shutil.which(agent.argv[0]) is None:
            problems.append(f"agents.{agent_name}.argv[0]: program not found: {agent.argv[0]}")
        if agent.cwd is not None and not agent.cwd.is_dir():
            problems.append(f"agents.{agent_name}.cwd: not a directory: {agent.cwd}")
    for row in PIPELINE:
        if not row.is_last and row.follow_up_agent not in config.agents:
            problems.append(
                f"agents: no {row.follow_up_agent!r}: step {row.number} results would be"
                " quarantined (the follow-up agent is not configured)"
            )
    return problems
