"""Benchmarks (pytest-benchmark): ``pytest bench/ --benchmark-only``; ``python -m bench.report`` makes the tables."""
