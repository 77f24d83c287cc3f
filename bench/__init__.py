"""Benchmarks: `make bench` (or `.venv/bin/python -m bench`). See README, "Performance"."""
