#!/usr/bin/env bash
# The README's first command: set up .venv and run the demo pipeline (steps 1 -> 6 on tiny
# models with real llama-server children; no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh
exec .venv/bin/prng-llm-daemon demo "$@"
