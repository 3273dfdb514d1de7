"""Shared pytest setup for resify's tests.

The tests import their helpers as top-level modules (``from reference import ...``, ``import styles``)
and the benchmarks as the package ``benchmarks`` (``from benchmarks.zoo import check_model``). Both
folders reach ``sys.path`` through the ``pythonpath`` setting of ``[tool.pytest.ini_options]`` in
pyproject.toml (the repository root and ``tests/``), not through code here.
"""
