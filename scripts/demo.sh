#!/usr/bin/env bash
# The README's first command: set up .venv and run the demo pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh
.venv/bin/prng-llm-daemon check-config --config config.example.json
.venv/bin/prng-llm-daemon validate examples/step2_scorer_meta_optimizer.json
