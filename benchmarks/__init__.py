"""resify's benchmarks: scripts that measure, not tests that assert (see benchmarks/README.md).

A package so that the scripts share ``benchmarks.common`` by a plain import: run each from the
repository root as ``python -m benchmarks.<name>``.
"""
