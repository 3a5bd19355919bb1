"""How llama.cpp is built for this CPU and compiler: native, except on an AMX CPU with GCC < 13.

`-march=native` on an AMX CPU compiles llama.cpp's AMX kernels, and GCC before 13 miscompiles
them: llama-server dies with a general protection fault in libggml-cpu.so right after "AMX model
buffer size" (Ollama #17205/#17249, llama.cpp #20824; Debian 12 ships GCC 12). There the build
names every instruction set the CPU reports instead, AMX left out. scripts/setup-venv.sh runs
this file with the system python, before any dependency is installed: stdlib only.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence, Set
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AMX", "BuildChoice", "Compiler", "choose", "compiler", "cpu_flags", "main"]

AMX = frozenset({"amx_tile", "amx_int8", "amx_bf16"})
"""/proc/cpuinfo flags of the AMX units."""
FIRST_GOOD_GCC = 13

# ggml/CMakeLists.txt option -> the /proc/cpuinfo flags it needs. With GGML_NATIVE=OFF,
# ggml-cpu compiles each option on into -m flags (GGML_AVX512: -mavx512f -mavx512cd -mavx512vl
# -mavx512dq -mavx512bw), and those left unset default to ON for the AVX2 generation: every one
# is set, ON or OFF, so a CPU without AVX2 is not handed it.
_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
)
_AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


@dataclass(frozen=True)
class Compiler:
    """A compiler as `--version` and `-dumpfullversion` name it; `version` "" if unknown."""

    command: str
    kind: str
    """"gcc", "clang", or "unknown"."""
    version: str

    @property
    def major(self) -> int | None:
        match = re.match(r"\d+", self.version)
        return int(match.group()) if match else None

    def __str__(self) -> str:
        return f"{self.command} ({self.kind} {self.version or '?'})"


@dataclass(frozen=True)
class BuildChoice:
    cmake_args: tuple[str, ...]
    """Empty: llama.cpp's default, GGML_NATIVE=ON."""
    reason: str


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo's text (x86: the `flags` line)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def compiler(command: str) -> Compiler:
    """What `command` is: GCC prints its version with -dumpfullversion (-dumpversion alone is
    the major only since GCC 7), clang with -dumpversion."""

    def ask(*args: str) -> str:
        try:
            done = subprocess.run(
                [command, *args], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    banner = ask("--version").lower()
    if "clang" in banner:
        return Compiler(command, "clang", ask("-dumpversion"))
    if "gcc" in banner or "g++" in banner or "free software foundation" in banner:
        return Compiler(command, "gcc", ask("-dumpfullversion", "-dumpversion"))
    return Compiler(command, "unknown", "")


def choose(flags: Set[str], compilers: Sequence[Compiler]) -> BuildChoice:
    """The cmake options for a CPU with `flags` built by `compilers` (C and C++)."""
    amx = sorted(flags & AMX)
    if not amx:
        return BuildChoice((), "native (-march=native): this CPU reports no AMX")
    # A GCC whose version cannot be read is not trusted either: the fault costs a dead server.
    bad = [c for c in compilers if c.kind == "gcc" and (c.major or 0) < FIRST_GOOD_GCC]
    if not bad:
        names = ", ".join(map(str, compilers))
        return BuildChoice((), f"native (-march=native, AMX on): {names} builds AMX code safely")
    on = [name for name, needs in _OPTIONS if all(flag in flags for flag in needs)]
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{name}={'ON' if name in on else 'OFF'}" for name, _ in _OPTIONS]
    args += [f"-D{name}=OFF" for name in _AMX_OPTIONS]
    reason = (
        f"GGML_NATIVE=OFF with {' '.join(n.removeprefix('GGML_') for n in on) or 'no SIMD'},"
        f" AMX off: this CPU has {'/'.join(amx)} and {bad[0]} miscompiles llama.cpp's AMX code"
        f" (GCC < {FIRST_GOOD_GCC}; llama.cpp #20824)"
    )
    return BuildChoice(tuple(args), reason)


def main(argv: Sequence[str]) -> int:
    """`cpuflags.py CC CXX`: the chosen cmake options on stdout, one line of why on stderr."""
    try:
        flags = cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        flags = frozenset()
    choice = choose(flags, [compiler(command) for command in dict.fromkeys(argv)])
    print(f"llama-server build: {choice.reason}", file=sys.stderr)
    print(" ".join(choice.cmake_args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
