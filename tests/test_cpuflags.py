"""The llama.cpp build options scripts/setup-venv.sh picks: native, except no AMX code from a
GCC older than 13 on an AMX CPU (it faults: llama.cpp #20824)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from prng_daemon.servers.cpuflags import Compiler, choose, compiler, cpu_flags

BASE = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma bmi1 bmi2 avx2 popcnt".split())
AVX512 = frozenset("avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi avx512_vnni".split())
# /proc/cpuinfo flags (the parts that matter) of three kinds of x86-64.
SAPPHIRE_RAPIDS = BASE | AVX512 | {"avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}
ZEN_4 = BASE | AVX512 | {"avx512_bf16"}
HASWELL = BASE

GCC_12 = Compiler("c++", "gcc", "12.2.0")
GCC_13 = Compiler("c++", "gcc", "13.2.0")
CLANG_14 = Compiler("c++", "clang", "14.0.6")


def options(args: tuple[str, ...]) -> dict[str, str]:
    return dict(a.removeprefix("-D").split("=") for a in args)


def test_an_amx_cpu_with_gcc_12_gets_every_feature_it_reports_but_amx() -> None:
    choice = choose(SAPPHIRE_RAPIDS, [Compiler("cc", "gcc", "12.2.0"), GCC_12])
    assert options(choice.cmake_args) == {
        "GGML_NATIVE": "OFF", "GGML_SSE42": "ON", "GGML_AVX": "ON", "GGML_AVX2": "ON",
        "GGML_FMA": "ON", "GGML_F16C": "ON", "GGML_BMI2": "ON", "GGML_AVX_VNNI": "ON",
        "GGML_AVX512": "ON", "GGML_AVX512_VBMI": "ON", "GGML_AVX512_VNNI": "ON",
        "GGML_AVX512_BF16": "ON", "GGML_AMX_TILE": "OFF", "GGML_AMX_INT8": "OFF",
        "GGML_AMX_BF16": "OFF",
    }  # fmt: skip
    assert choice.reason == (
        "GGML_NATIVE=OFF with SSE42 AVX AVX2 FMA F16C BMI2 AVX_VNNI AVX512 AVX512_VBMI"
        " AVX512_VNNI AVX512_BF16, AMX off: this CPU has amx_bf16/amx_int8/amx_tile and cc"
        " (gcc 12.2.0) miscompiles llama.cpp's AMX code (GCC < 13; llama.cpp #20824)"
    )


def test_an_option_is_on_only_when_the_cpu_reports_all_it_compiles_with() -> None:
    """GGML_AVX512 means -mavx512f/cd/vl/dq/bw: one missing, and it stays off."""
    flags = SAPPHIRE_RAPIDS - {"avx512bw", "avx_vnni"}
    chosen = options(choose(flags, [GCC_12]).cmake_args)
    assert chosen["GGML_AVX512"] == chosen["GGML_AVX_VNNI"] == "OFF"
    assert chosen["GGML_AVX512_VNNI"] == chosen["GGML_AVX2"] == "ON"


def test_native_where_amx_code_is_safe_or_absent() -> None:
    """GCC 13 and clang build AMX code right; a Zen 4 or an AVX2-only CPU has no AMX."""
    for flags, compilers in [
        (SAPPHIRE_RAPIDS, [GCC_13]), (SAPPHIRE_RAPIDS, [CLANG_14]),
        (ZEN_4, [GCC_12]), (HASWELL, [GCC_12]), (frozenset(), [GCC_12]),
    ]:  # fmt: skip
        choice = choose(flags, compilers)
        assert choice.cmake_args == () and choice.reason.startswith("native"), choice
    assert choose(ZEN_4, [GCC_12]).reason == "native (-march=native): this CPU reports no AMX"


def test_one_old_gcc_among_the_compilers_or_an_unreadable_version_is_not_trusted() -> None:
    assert choose(SAPPHIRE_RAPIDS, [GCC_13, GCC_12]).cmake_args[0] == "-DGGML_NATIVE=OFF"
    unknown = Compiler("c++", "gcc", "")
    assert choose(SAPPHIRE_RAPIDS, [unknown]).cmake_args[0] == "-DGGML_NATIVE=OFF"


def test_cpuinfo_flags_are_the_first_cpus() -> None:
    text = "processor\t: 0\nflags\t\t: fpu avx2 amx_tile\n\nprocessor\t: 1\nflags\t: fpu\n"
    assert cpu_flags(text) == {"fpu", "avx2", "amx_tile"}
    assert cpu_flags("Features\t: fp asimd\n") == frozenset()


def test_the_compilers_on_this_machine_are_recognised() -> None:
    gcc = shutil.which("gcc")
    assert gcc is not None, "the build needs a compiler"
    found = compiler(gcc)
    assert found.kind == "gcc" and found.major is not None and found.version.count(".") == 2
    assert compiler("/nonexistent/cc") == Compiler("/nonexistent/cc", "unknown", "")


def test_setup_venv_runs_it_with_the_system_python_and_gets_one_line() -> None:
    """As scripts/setup-venv.sh does: the file alone, no package, no dependency."""
    script = Path(__file__).parent.parent / "prng_daemon" / "servers" / "cpuflags.py"
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(script), "cc", "c++"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    (line,) = done.stderr.splitlines()
    assert line.startswith("llama-server build: ")
    native = done.stdout.strip() == ""
    assert native == line.startswith("llama-server build: native"), (done.stdout, line)
