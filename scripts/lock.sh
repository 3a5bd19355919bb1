#!/usr/bin/env bash
# Refresh requirements/lock.txt on purpose: the newest releases pyproject.toml's ranges allow,
# pinned with their sha256 hashes (pip-tools' pip-compile, in a throwaway venv), then the whole
# suite (scripts/test.sh) on them. A release that breaks the suite shows up here, not on a
# newcomer's clone: the old lock is put back and the script fails.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
old=$(mktemp)
trap 'rm -rf "$tools" "$old"' EXIT
cp requirements/lock.txt "$old"
"${PYTHON:-python3}" -m venv "$tools"
"$tools/bin/python" -m pip install -q pip-tools
# The package itself (the test extra names prng-llm-daemon[demo]) is installed from the
# checkout by scripts/setup-venv.sh, not pinned.
"$tools/bin/pip-compile" -q --extra test --generate-hashes --strip-extras --upgrade \
    --no-emit-index-url --no-emit-find-links --unsafe-package prng-llm-daemon \
    --output-file requirements/lock.txt pyproject.toml
if cmp -s "$old" requirements/lock.txt; then
    echo "requirements/lock.txt: nothing newer to lock" >&2
    exit 0
fi
diff <(grep -E '^[a-z0-9_.-]+==' "$old") <(grep -E '^[a-z0-9_.-]+==' requirements/lock.txt) >&2 || true
if ! scripts/test.sh "$@"; then
    cp "$old" requirements/lock.txt
    scripts/setup-venv.sh
    echo "the suite fails on the refreshed versions above: requirements/lock.txt is left as it was" >&2
    exit 1
fi
echo "requirements/lock.txt refreshed and the suite passes on it: commit it" >&2
