"""Writes for evaluation, one module per concern: suites, runs, review."""
