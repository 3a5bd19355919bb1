"""Where a llama-server child really runs: the GPUs llama-server itself can use, the memory its
process holds on them, and what to say when the GPU it was given is not there.

The device list comes from `llama-server --list-devices`, run with the child's own environment
(CUDA_VISIBLE_DEVICES included) just before the child starts. Of the three sources llama-server
offers it is the one that holds across versions: it is the same device enumeration the child
makes, printed with printf whatever the log verbosity, in one format since the flag appeared
(llama.cpp PR #10497, November 2024). The load log's `using device CUDA0` and `offloaded N/M
layers to GPU` are libllama INFO lines that newer builds (11434 among them) hide at the default
verbosity, and `/props` names no device at all. One load-log line is still used, as a
cross-check and for builds older than `--list-devices`: `no usable GPU found, --gpu-layers
option will be ignored`, which llama-server writes to stderr, unfiltered, when `--n-gpu-layers`
meets no GPU (seen with build 11434 here, and on an H100 with CUDA_VISIBLE_DEVICES naming an
absent GPU).

Memory per process comes from NVML (the `nvidia-ml-py` package, import name `pynvml`, when
installed), else from `nvidia-smi`; where neither answers (no NVIDIA driver) there is none.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "NO_GPU_LINE",
    "Device",
    "Listing",
    "gpu_memory_by_pid",
    "list_devices",
    "nvidia_gpus",
    "no_gpu_reason",
    "parse_compute_apps",
    "parse_devices",
    "where",
    "without_gpu_pin",
]

LIST_TIMEOUT_SECONDS = 60.0
"""`--list-devices` initialises every GPU backend: a second or two on a big box, never a minute."""
SMI_TIMEOUT_SECONDS = 10.0

NO_GPU_LINE = re.compile(rb"no usable GPU found|not compiled with GPU offload support")
"""What llama-server writes (at any verbosity) when `--n-gpu-layers` will be ignored; the second
form is the wording of older builds."""
_DEVICE = re.compile(r"^\s+(\S+): (.*) \((\d+) MiB, (\d+) MiB free\)\s*$")
_BACKEND_ERROR = re.compile(r"failed to initialize (\w+): (.+)$", re.MULTILINE)


@dataclass(frozen=True)
class Device:
    """One GPU as llama-server names it (CUDA0 is the first GPU the child can see)."""

    name: str
    description: str
    total_mib: int
    free_mib: int


@dataclass(frozen=True)
class Listing:
    """What `llama-server --list-devices` said: `devices` is None when this build has no such
    flag (before November 2024); `output` keeps its text for explaining an empty list."""

    devices: tuple[Device, ...] | None
    output: str


def parse_devices(output: str) -> tuple[Device, ...] | None:
    """The GPUs in `--list-devices` output (`  CUDA0: NVIDIA H100 80GB HBM3 (81079 MiB, 80454
    MiB free)`, or `  (none)`); None without its `Available devices:` header."""
    lines = output.splitlines()
    try:
        start = lines.index("Available devices:")
    except ValueError:
        return None
    found = []
    for line in lines[start + 1 :]:
        match = _DEVICE.match(line)
        if match:
            name, description, total, free = match.groups()
            found.append(Device(name, description, int(total), int(free)))
    return tuple(found)


def list_devices(binary: str, env: Mapping[str, str]) -> Listing:
    """Run `binary --list-devices` with `env` (blocking: call it off the event loop)."""
    try:
        done = subprocess.run(
            [binary, "--list-devices"], env=dict(env), stdin=subprocess.DEVNULL,
            capture_output=True, timeout=LIST_TIMEOUT_SECONDS, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Listing(None, str(exc))
    output = (done.stdout + done.stderr).decode("utf-8", "replace")
    return Listing(parse_devices(output), output)


def without_gpu_pin(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with every GPU visible, to tell "that GPU is missing" from "no GPU at all"."""
    return {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}


def no_gpu_reason(gpu_id: int, pinned: Listing, everything: Listing) -> str:
    """Why llama-server sees no GPU under CUDA_VISIBLE_DEVICES=`gpu_id`, in one phrase:
    `pinned` is its listing so, `everything` its listing with every GPU visible."""
    if everything.devices:
        seen = ", ".join(f"{d.name} {d.description}" for d in everything.devices)
        return f"GPU {gpu_id} not found (llama-server sees {seen})"
    error = _BACKEND_ERROR.search(pinned.output)
    if error:
        return f"GPU {gpu_id} not found ({error.group(1)}: {error.group(2).strip()})"
    unknown = "llama-server lists no GPU: built without GPU support, or no driver"
    return f"GPU {gpu_id} not found ({unknown})"


def where(placement: str | None, vram_mib: int | None) -> str:
    """`on GPU1, 5.4 GiB` / `on CPU` / "" (not known), for `status` and STATUS=."""
    if placement is None:
        return ""
    memory = f", {vram_mib / 1024:.1f} GiB" if vram_mib is not None else ""
    return f"on {placement}{memory}"


# --- the NVIDIA driver: NVML through nvidia-ml-py, else nvidia-smi --------------------------

_nvml_lock = threading.Lock()
_nvml: Any = None
"""The pynvml module once nvmlInit() succeeded; False once it failed or is not installed."""


def _nvml_module() -> Any:
    global _nvml
    with _nvml_lock:
        if _nvml is None:
            try:
                import pynvml

                pynvml.nvmlInit()
            except Exception:  # not installed, or no driver: NVMLError_LibraryNotFound, ...
                _nvml = False
            else:
                _nvml = pynvml
        return _nvml


def _smi(*query: str) -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run(
            [smi, *query, "--format=csv,noheader,nounits"], capture_output=True,
            timeout=SMI_TIMEOUT_SECONDS, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


def parse_compute_apps(text: str) -> dict[int, int]:
    """`nvidia-smi --query-compute-apps=pid,used_memory` lines to {pid: MiB}, summed over GPUs."""
    used: dict[int, int] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            used[int(parts[0])] = used.get(int(parts[0]), 0) + int(parts[1])
    return used


def gpu_memory_by_pid() -> dict[int, int] | None:
    """MiB of GPU memory each process holds, summed over its GPUs; None when no NVIDIA driver
    answers. Blocking (nvidia-smi is a subprocess): call it off the event loop."""
    nvml = _nvml_module()
    if nvml:
        used: dict[int, int] = {}
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    mib = (proc.usedGpuMemory or 0) // (1024 * 1024)
                    used[proc.pid] = used.get(proc.pid, 0) + mib
        except nvml.NVMLError:
            return None
        return used
    text = _smi("--query-compute-apps=pid,used_memory")
    return None if text is None else parse_compute_apps(text)


def nvidia_gpus() -> int | None:
    """How many GPUs the NVIDIA driver reports; None when no driver answers."""
    nvml = _nvml_module()
    if nvml:
        try:
            return int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError:
            return None
    text = _smi("--query-gpu=index")
    return None if text is None else len(text.split())
