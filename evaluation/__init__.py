"""Benchmark suites, evaluation runs in a sandbox, the admission policy and the review queue."""
