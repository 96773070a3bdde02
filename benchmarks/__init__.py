"""Benchmarks and studies of sam_optax (run on purpose, not by the test suite)."""
