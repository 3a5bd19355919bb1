#!/usr/bin/env bash
# Refresh requirements/lock.txt on purpose: the newest releases pyproject.toml's ranges allow,
# pinned with their sha256 hashes (pip-tools' pip-compile, in a throwaway venv). Then run
# scripts/test.sh: a release that breaks the suite shows up here, not on a newcomer's clone.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"${PYTHON:-python3}" -m venv "$tools"
"$tools/bin/python" -m pip install -q pip-tools
# The package itself (the test extra names prng-llm-daemon[demo]) is installed from the
# checkout by scripts/setup-venv.sh, not pinned.
"$tools/bin/pip-compile" -q --extra test --generate-hashes --strip-extras --upgrade \
    --no-emit-index-url --no-emit-find-links --unsafe-package prng-llm-daemon \
    --output-file requirements/lock.txt pyproject.toml
echo "requirements/lock.txt refreshed; now run scripts/test.sh before committing it" >&2
