"""Benchmark suites: every module here with a ``run(ctx)`` function is one suite (see benchmarks.runner)."""
