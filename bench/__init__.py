"""Benchmarks: one script per measurement, run as `python -m bench.<script>` from the
repository root; bench/RESULTS.md has the numbers."""
