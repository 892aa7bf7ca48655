"""Benchmarks, each run as `python -m bench.<name>` from the repo root; the last line printed is JSON."""
