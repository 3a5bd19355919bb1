#!/usr/bin/env bash
# The README's test command: set up .venv, lint (as `make lint`), and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh
.venv/bin/python -m ruff check prng_daemon tests bench
.venv/bin/python -m ruff format --check prng_daemon tests bench
.venv/bin/python -m mypy
.venv/bin/python -m pytest "$@"
