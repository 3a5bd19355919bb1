.PHONY: demo test lint bench venv lock

venv:
	scripts/setup-venv.sh

demo:
	scripts/demo.sh

test:
	scripts/test.sh

lint: venv
	.venv/bin/python -m ruff check prng_daemon tests bench
	.venv/bin/python -m ruff format --check prng_daemon tests bench
	.venv/bin/python -m mypy

bench: venv
	for b in bench/bench_*.py; do .venv/bin/python -m bench.$$(basename $$b .py) || exit 1; done

# Refresh requirements/lock.txt on purpose; it keeps the old lock if the suite fails on the new one.
lock:
	scripts/lock.sh
