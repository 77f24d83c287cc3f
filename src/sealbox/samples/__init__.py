"""Generators of realistic unsigned inputs for each format (demo, benchmarks, tests)."""
