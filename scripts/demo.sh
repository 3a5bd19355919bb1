#!/usr/bin/env bash
# The README's first command: set up .venv and run the demo pipeline, steps 1 -> 6, decided by
# a real model on the CPU (fetched once, ~1.1 GB, into ~/.cache/prng-llm-daemon; no GPU needed).
# `scripts/demo.sh --tiny` runs it on tiny random-weight models instead, in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh
exec .venv/bin/prng-llm-daemon demo "$@"
