"""Benchmarks: run as scripts (``python bench/<name>.py``), never installed or imported by the
project; see docs/benchmarks.md."""
